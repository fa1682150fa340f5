import TapCore
import TapJSON

/// Reads a request body's fields strictly: the body must be a JSON object, every key must be
/// one the endpoint knows, and every value must have the type asked for. Pure.
struct Body {
    private let object: JSONObject

    /// `allowed` in the order they are documented; the first unknown key is reported. A key
    /// of `fixed` is known but cannot be changed here (a create-only field in a PATCH): 400
    /// `invalid_field` naming it, so the client learns it is not a typo.
    init(_ bytes: [UInt8], allowed: [String], fixed: [String] = [], required: Bool = true) throws(APIError) {
        if bytes.isEmpty || bytes.allSatisfy({ $0 == 0x20 || $0 == 0x0a || $0 == 0x0d || $0 == 0x09 }) {
            guard !required else { throw APIError.invalidJSON("a JSON object body is required") }
            object = [:]
            return
        }
        let json: JSON
        do {
            json = try JSON.parse(bytes)
        } catch {
            throw APIError.invalidJSON(error)
        }
        guard case .object(let o) = json else {
            throw APIError.invalidJSON("the body must be a JSON object, not \(json.typeName)")
        }
        for key in o.keys where !allowed.contains(key) {
            if fixed.contains(key) { throw APIError.invalidField(key, "is set at create only; delete and create the device to change it") }
            throw APIError.unknownField(key)
        }
        object = o
    }

    func string(_ key: String) throws(APIError) -> String? {
        guard let v = object[key] else { return nil }
        guard case .string(let s) = v else { throw APIError.invalidField(key, "must be a string, not \(v.typeName)") }
        return s
    }

    /// An object of strings (`labels`).
    func stringMap(_ key: String) throws(APIError) -> [String: String]? {
        guard let v = object[key] else { return nil }
        guard case .object(let o) = v else { throw APIError.invalidField(key, "must be an object of strings") }
        var out: [String: String] = [:]
        for (k, value) in o.entries {
            guard case .string(let s) = value else { throw APIError.invalidField(key, "the value of '\(k)' must be a string") }
            out[k] = s
        }
        return out
    }

    func bool(_ key: String) throws(APIError) -> Bool? {
        guard let v = object[key] else { return nil }
        guard case .bool(let b) = v else { throw APIError.invalidField(key, "must be a boolean, not \(v.typeName)") }
        return b
    }

    func int(_ key: String, in range: ClosedRange<Int>? = nil) throws(APIError) -> Int? {
        guard let v = object[key] else { return nil }
        guard case .int(let i) = v else { throw APIError.invalidField(key, "must be an integer, not \(v.typeName)") }
        // Compared as Int64, before any conversion or arithmetic: no value traps.
        if let range, !(Int64(range.lowerBound)...Int64(range.upperBound)).contains(i) {
            throw APIError.invalidField(key, "must be between \(range.lowerBound) and \(range.upperBound)")
        }
        return Int(i)
    }

    /// An array of integers, each in `range`.
    func intArray(_ key: String, in range: ClosedRange<Int>) throws(APIError) -> [Int]? {
        guard let v = object[key] else { return nil }
        guard case .array(let items) = v else { throw APIError.invalidField(key, "must be an array of integers, not \(v.typeName)") }
        var out: [Int] = []
        for item in items {
            guard case .int(let i) = item else {
                throw APIError.invalidField(key, "must be an array of integers, not one with \(item.typeName)")
            }
            guard (Int64(range.lowerBound)...Int64(range.upperBound)).contains(i) else {
                throw APIError.invalidField(key, "\(i) is not between \(range.lowerBound) and \(range.upperBound)")
            }
            out.append(Int(i))
        }
        return out
    }

    func oneOf<T: RawRepresentable & CaseIterable>(_ key: String, _: T.Type) throws(APIError) -> T? where T.RawValue == String {
        guard let s = try string(key) else { return nil }
        guard let value = T(rawValue: s) else {
            throw APIError.invalidField(key, "must be one of \(T.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return value
    }

    func required<T>(_ key: String, _ value: T?) throws(APIError) -> T {
        guard let value else { throw APIError.invalidField(key, "is required") }
        return value
    }
}
