import TapCore
import TapJSON

/// The API's paths, parsed. Pure: no manager, no sockets.
public enum Route: Equatable, Sendable {
    case health
    case limits
    case devices
    case device(String)
    case queues(String)
    case queue(String, Int)
    case stats(String)
    case metrics
    case spec

    /// Nil for a path the API does not have.
    public init?(path: String) {
        guard path.utf8.first == UInt8(ascii: "/") else { return nil }
        // Substrings compared in place: no String per segment, no array literal per case.
        let parts = path.utf8.dropFirst().split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: false)
        func part(_ i: Int) -> Substring { Substring(parts[i]) }
        switch parts.count {
        case 1 where part(0) == "metrics": self = .metrics
        case 1 where part(0) == "openapi.yaml": self = .spec
        case 2 where part(0) == "v1" && part(1) == "health": self = .health
        case 2 where part(0) == "v1" && part(1) == "limits": self = .limits
        case 2 where part(0) == "v1" && part(1) == "devices": self = .devices
        case 3...5:
            guard part(0) == "v1", part(1) == "devices", !parts[2].isEmpty else { return nil }
            let name = String(part(2))
            switch parts.count {
            case 3: self = .device(name)
            case 4 where part(3) == "queues": self = .queues(name)
            case 4 where part(3) == "stats": self = .stats(name)
            case 5 where part(3) == "queues":
                // Ids are small non-negative integers; anything else names no queue.
                let text = part(4)
                guard text.utf8.count <= 9, text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
                      let id = Int(text), String(id) == text else { return nil }
                self = .queue(name, id)
            default: return nil
            }
        default: return nil
        }
    }

    public var allowed: [String] {
        switch self {
        case .health, .stats, .metrics, .spec: return ["GET"]
        case .limits: return ["GET", "PUT"]
        case .devices, .queues: return ["GET", "POST"]
        case .device, .queue: return ["GET", "PATCH", "DELETE"]
        }
    }
}

/// Turns requests into responses: one exhaustive match of route and method, and the one
/// conversion of every thrown error into its response.
public struct Router: Sendable {
    public let manager: DeviceManager

    public init(manager: DeviceManager) { self.manager = manager }

    public func handle(_ r: HTTPRequest) -> HTTPResponse {
        do {
            return try dispatch(r)
        } catch let e as APIError {
            return e.response
        } catch let e as ManagerError {
            return APIError(e).response
        } catch {
            return APIError.internalError(error).response
        }
    }

    private func dispatch(_ r: HTTPRequest) throws -> HTTPResponse {
        guard let route = Route(path: r.path) else { throw APIError.notFound("no such path: \(r.path)") }
        guard route.allowed.contains(r.method) else { throw APIError.methodNotAllowed(r.method, allow: route.allowed) }
        if ["POST", "PUT", "PATCH"].contains(r.method) && !r.body.isEmpty && !Self.isJSON(r.contentType) {
            throw APIError.unsupportedMediaType(r.contentType)
        }
        let m = manager
        switch (route, r.method) {
        case (.health, _): return HealthResource.get()
        case (.limits, "GET"): return LimitsResource.get(m)
        case (.limits, _): return try LimitsResource.put(m, r)
        case (.devices, "GET"): return DevicesResource.list(m)
        case (.devices, _): return try DevicesResource.create(m, r)
        case (.device(let n), "GET"): return try DevicesResource.get(m, n)
        case (.device(let n), "PATCH"): return try DevicesResource.patch(m, n, r)
        case (.device(let n), _): return try DevicesResource.delete(m, n)
        case (.queues(let n), "GET"): return try QueuesResource.list(m, n)
        case (.queues(let n), _): return try QueuesResource.add(m, n, r)
        case (.queue(let n, let id), "GET"): return try QueuesResource.get(m, n, id)
        case (.queue(let n, let id), "PATCH"): return try QueuesResource.patch(m, n, id, r)
        case (.queue(let n, let id), _): return try QueuesResource.delete(m, n, id)
        case (.stats(let n), _): return try StatsResource.get(m, n)
        case (.metrics, _): return MetricsResource.get(m)
        case (.spec, _): return SpecResource.get()
        }
    }

    /// `application/json`, with or without parameters (`; charset=utf-8`).
    static func isJSON(_ contentType: String?) -> Bool {
        guard let ct = contentType else { return false }
        let media = ct.split(separator: ";", maxSplits: 1).first.map { $0.trimmingCharacters(in: " \t") } ?? ""
        return media.lowercased() == "application/json"
    }
}

extension Substring {
    func trimmingCharacters(in set: String) -> String {
        var s = self
        while let c = s.first, set.contains(c) { s.removeFirst() }
        while let c = s.last, set.contains(c) { s.removeLast() }
        return String(s)
    }
}
