import TapCore
import TapJSON
import TunKit

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

    /// The device a route names, if any.
    public var device: String? {
        switch self {
        case .device(let n), .queues(let n), .queue(let n, _), .stats(let n): return n
        case .health, .limits, .devices, .metrics, .spec: return nil
        }
    }

    /// The queue id a route names, if any.
    public var queueID: Int? {
        if case .queue(_, let id) = self { return id }
        return nil
    }

    /// The route without its parameters: what the router's table is keyed by.
    public enum Kind: Hashable, Sendable {
        case health, limits, devices, device, queues, queue, stats, metrics, spec
    }

    public var kind: Kind {
        switch self {
        case .health: return .health
        case .limits: return .limits
        case .devices: return .devices
        case .device: return .device
        case .queues: return .queues
        case .queue: return .queue
        case .stats: return .stats
        case .metrics: return .metrics
        case .spec: return .spec
        }
    }

    /// The methods the route answers, as the router's table has them (for `Allow`).
    public var allowed: [String] { Router.methods(of: kind) }
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

    /// A handler gets the manager, the parsed route (for its parameters) and the request.
    typealias Handler = @Sendable (DeviceManager, Route, HTTPRequest) throws -> HTTPResponse

    /// Every (route, method) the API answers, and who answers it. `Allow` is derived from
    /// this table, so a method is allowed exactly where a handler exists.
    static let table: [Route.Kind: [(method: String, handler: Handler)]] = [
        .health: [("GET", { _, _, _ in HealthResource.get() })],
        .limits: [
            ("GET", { m, _, _ in LimitsResource.get(m) }),
            ("PUT", { m, _, r in try LimitsResource.put(m, r) }),
        ],
        .devices: [
            ("GET", { m, _, _ in DevicesResource.list(m) }),
            ("POST", { m, _, r in try DevicesResource.create(m, r) }),
        ],
        .device: [
            ("GET", { m, route, _ in try DevicesResource.get(m, route.device!) }),
            ("PATCH", { m, route, r in try DevicesResource.patch(m, route.device!, r) }),
            ("DELETE", { m, route, _ in try DevicesResource.delete(m, route.device!) }),
        ],
        .queues: [
            ("GET", { m, route, _ in try QueuesResource.list(m, route.device!) }),
            ("POST", { m, route, r in try QueuesResource.add(m, route.device!, r) }),
        ],
        .queue: [
            ("GET", { m, route, _ in try QueuesResource.get(m, route.device!, route.queueID!) }),
            ("PATCH", { m, route, r in try QueuesResource.patch(m, route.device!, route.queueID!, r) }),
            ("DELETE", { m, route, _ in try QueuesResource.delete(m, route.device!, route.queueID!) }),
        ],
        .stats: [("GET", { m, route, _ in try StatsResource.get(m, route.device!) })],
        .metrics: [("GET", { m, _, _ in MetricsResource.get(m) })],
        .spec: [("GET", { _, _, _ in SpecResource.get() })],
    ]

    static func methods(of kind: Route.Kind) -> [String] { table[kind, default: []].map(\.method) }

    private func dispatch(_ r: HTTPRequest) throws -> HTTPResponse {
        guard let route = Route(path: r.path) else { throw APIError.notFound("no such path: \(r.path)") }
        let endpoints = Self.table[route.kind, default: []]
        guard let handler = endpoints.first(where: { $0.method == r.method })?.handler else {
            throw APIError.methodNotAllowed(r.method, allow: endpoints.map(\.method))
        }
        if ["POST", "PUT", "PATCH"].contains(r.method) && !r.body.isEmpty && !Self.isJSON(r.contentType) {
            throw APIError.unsupportedMediaType(r.contentType)
        }
        return try handler(manager, route, r)
    }

    /// `application/json`, with or without parameters (`; charset=utf-8`).
    static func isJSON(_ contentType: String?) -> Bool {
        guard let ct = contentType else { return false }
        let media = ct.split(separator: ";", maxSplits: 1).first.map(\.trimmingWhitespace) ?? ""
        return media.lowercased() == "application/json"
    }
}
