import CJansson

/// A JSON value. The only code that touches jansson is in this file: parsing (with duplicate
/// keys rejected, and jansson's line and column kept in errors) and compact serialisation.
public enum JSON: Equatable, Sendable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object(JSONObject)

    /// Why a text is not JSON: jansson's message and where it stopped.
    public struct ParseError: Error, Equatable, Sendable {
        public let line: Int
        public let column: Int
        public let message: String
    }

    /// Parses any JSON value. The corresponding C call is `json_loadb` with
    /// `JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL`: `\u0000` in a string is
    /// valid JSON, so it parses, and strings are read whole by their length; the field's own
    /// rules then refuse it, naming the field. (jansson refuses it in an object key still.)
    public static func parse(_ bytes: [UInt8]) throws(ParseError) -> JSON {
        var error = json_error_t()
        let root: UnsafeMutablePointer<json_t>? = bytes.withUnsafeBytes { raw in
            // SAFETY: jansson reads exactly `count` bytes from the buffer during the call and
            // keeps no pointer into it; bytes are bytes, so viewing them as CChar is sound.
            let p = raw.baseAddress?.assumingMemoryBound(to: CChar.self) ?? UnsafePointer(bitPattern: 1)!
            return json_loadb(p, raw.count, Int(JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL), &error)
        }
        guard let root else {
            let message = withUnsafeBytes(of: &error.text) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            throw ParseError(line: Int(error.line), column: Int(error.column), message: message)
        }
        defer { mqt_json_decref(root) }
        return JSON(root)
    }

    public static func parse(_ text: String) throws(ParseError) -> JSON {
        try parse(Array(text.utf8))
    }

    private init(_ j: UnsafeMutablePointer<json_t>) {
        switch mqt_json_typeof(j) {
        case JSON_OBJECT:
            var entries: [(key: String, value: JSON)] = []
            var it = json_object_iter(j)
            while let i = it {
                entries.append((String(cString: json_object_iter_key(i)), JSON(json_object_iter_value(i))))
                it = json_object_iter_next(j, i)
            }
            self = .object(JSONObject(entries))
        case JSON_ARRAY:
            self = .array((0..<json_array_size(j)).map { JSON(json_array_get(j, $0)) })
        case JSON_STRING:
            let p = UnsafeRawPointer(json_string_value(j)!)
            self = .string(String(decoding: UnsafeRawBufferPointer(start: p, count: json_string_length(j)), as: UTF8.self))
        case JSON_INTEGER:
            self = .int(Int64(json_integer_value(j)))
        case JSON_REAL:
            self = .double(json_real_value(j))
        case JSON_TRUE:
            self = .bool(true)
        case JSON_FALSE:
            self = .bool(false)
        default:
            self = .null
        }
    }

    /// Compact text (no spaces), object keys in their order.
    public func serialized() -> [UInt8] {
        let root = makeJansson()
        defer { mqt_json_decref(root) }
        let flags = Int(JSON_COMPACT | JSON_ENCODE_ANY)
        // One pass in the common case: a buffer of a size most responses fit, and a second
        // pass only when json_dumpb reports (as it does either way) that it needed more.
        var capacity = 4096
        while true {
            var needed = 0
            let out = [UInt8](unsafeUninitializedCapacity: capacity) { buf, count in
                // SAFETY: json_dumpb writes at most `capacity` bytes into the buffer and
                // returns the size of the whole text; bytes viewed as CChar are still bytes.
                needed = buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: capacity) {
                    json_dumpb(root, $0, capacity, flags)
                }
                count = needed <= capacity ? needed : 0
            }
            if needed <= capacity { return out }
            capacity = needed
        }
    }

    public var text: String { String(decoding: serialized(), as: UTF8.self) }

    /// A new jansson value with one reference, owned by the caller.
    private func makeJansson() -> UnsafeMutablePointer<json_t> {
        switch self {
        case .null: return json_null()
        case .bool(let b): return b ? json_true() : json_false()
        case .int(let i): return json_integer(json_int_t(i))
        case .double(let d): return json_real(d)
        case .string(let s):
            // Swift strings are valid UTF-8, so jansson's check is skipped; it copies the bytes.
            return Self.withBytes(of: s) { json_stringn_nocheck($0, $1) }
        case .array(let items):
            let a = json_array()!
            for item in items { json_array_append_new(a, item.makeJansson()) }
            return a
        case .object(let o):
            let obj = json_object()!
            // json_object_setn_new_nocheck takes the value's reference and copies the key.
            for (k, v) in o.entries {
                _ = Self.withBytes(of: k) { json_object_setn_new_nocheck(obj, $0, $1, v.makeJansson()) }
            }
            return obj
        }
    }

    /// A string's UTF-8 bytes as jansson takes them (pointer and length, no NUL needed),
    /// without the copy into a C string that passing a String to a `const char *` makes.
    private static func withBytes<R>(of s: String, _ body: (UnsafePointer<CChar>, Int) -> R) -> R {
        if let r = s.utf8.withContiguousStorageIfAvailable({ buf in
            // SAFETY: a native string's UTF-8 storage, valid for the closure; jansson copies
            // what it keeps. An empty buffer may have no base address: any valid pointer
            // does for zero bytes.
            let base = UnsafeRawPointer(buf.baseAddress) ?? UnsafeRawPointer(bitPattern: 1)!
            return body(base.assumingMemoryBound(to: CChar.self), buf.count)
        }) {
            return r
        }
        var copy = s
        return copy.withUTF8 { buf in
            let base = UnsafeRawPointer(buf.baseAddress) ?? UnsafeRawPointer(bitPattern: 1)!
            return body(base.assumingMemoryBound(to: CChar.self), buf.count)
        }
    }
}

/// A JSON object that keeps its keys in order (for stable output); keys are unique.
public struct JSONObject: Equatable, Sendable, ExpressibleByDictionaryLiteral {
    public private(set) var entries: [(key: String, value: JSON)]

    public init(_ entries: [(key: String, value: JSON)]) { self.entries = entries }

    public init(dictionaryLiteral elements: (String, JSON)...) {
        entries = elements.map { (key: $0.0, value: $0.1) }
    }

    public subscript(key: String) -> JSON? {
        get { entries.first { $0.key == key }?.value }
        set {
            if let i = entries.firstIndex(where: { $0.key == key }) {
                if let v = newValue { entries[i].value = v } else { entries.remove(at: i) }
            } else if let v = newValue {
                entries.append((key, v))
            }
        }
    }

    public var keys: [String] { entries.map(\.key) }

    public static func == (a: JSONObject, b: JSONObject) -> Bool {
        a.entries.count == b.entries.count && a.entries.allSatisfy { b[$0.key] == $0.value }
    }
}

extension JSON: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
    ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral, ExpressibleByNilLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSON...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSON)...) {
        self = .object(JSONObject(elements.map { (key: $0.0, value: $0.1) }))
    }
    public init(nilLiteral: ()) { self = .null }

    public init(_ i: Int) { self = .int(Int64(i)) }
    /// Counters are u64; JSON integers here are i64, so the top half saturates.
    public init(_ u: UInt64) { self = .int(Int64(clamping: u)) }

    public subscript(key: String) -> JSON? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    /// A short name of the value's type for error messages.
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "boolean"
        case .int: return "integer"
        case .double: return "number"
        case .string: return "string"
        case .array: return "array"
        case .object: return "object"
        }
    }
}

extension JSON: CustomStringConvertible {
    /// Strings bare, everything else as compact JSON (for tables).
    public var description: String {
        if case .string(let s) = self { return s }
        return text
    }

    public var string: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var int: Int? {
        if case .int(let i) = self { return Int(i) }
        return nil
    }

    public var array: [JSON]? {
        if case .array(let a) = self { return a }
        return nil
    }
}
