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
    case leases(String)
    case lease(String, String)
    case events
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
        case 2 where part(0) == "v1" && part(1) == "events": self = .events
        case 3...5:
            guard part(0) == "v1", part(1) == "devices", !parts[2].isEmpty else { return nil }
            let name = String(part(2))
            switch parts.count {
            case 3: self = .device(name)
            case 4 where part(3) == "queues": self = .queues(name)
            case 4 where part(3) == "stats": self = .stats(name)
            case 4 where part(3) == "leases": self = .leases(name)
            case 5 where part(3) == "leases" && !parts[4].isEmpty: self = .lease(name, String(part(4)))
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
        case .device(let n), .queues(let n), .queue(let n, _), .stats(let n), .leases(let n), .lease(let n, _): return n
        case .health, .limits, .devices, .events, .metrics, .spec: return nil
        }
    }

    /// The queue id a route names, if any.
    public var queueID: Int? {
        if case .queue(_, let id) = self { return id }
        return nil
    }

    /// The lease id a route names, if any.
    public var leaseID: String? {
        if case .lease(_, let id) = self { return id }
        return nil
    }

    /// The route without its parameters: what the router's table is keyed by.
    public enum Kind: Hashable, Sendable {
        case health, limits, devices, device, queues, queue, stats, leases, lease, events, metrics, spec
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
        case .leases: return .leases
        case .lease: return .lease
        case .events: return .events
        case .metrics: return .metrics
        case .spec: return .spec
        }
    }
}

/// Turns requests into responses: one exhaustive match of route and method, and the one
/// conversion of every thrown error into its response.
public struct Router: Sendable {
    public let manager: DeviceManager
    /// Where lease connections are watched once upgraded.
    public let leaseWatcher: LeaseWatcher
    /// Where event streams are kept alive.
    public let events: EventHub
    /// What a TCP request must carry; nil: the router serves no TCP listener.
    public let token: BearerToken?

    public init(manager: DeviceManager, leaseWatcher: LeaseWatcher, events: EventHub, token: BearerToken? = nil) {
        self.manager = manager
        self.leaseWatcher = leaseWatcher
        self.events = events
        self.token = token
    }

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

    /// A handler gets the router (for the manager and the lease watcher), the parsed route
    /// (for its parameters) and the request.
    typealias Handler = @Sendable (Router, Route, HTTPRequest) throws -> HTTPResponse

    /// One (route, method) the API answers: who answers it, and where it runs.
    struct Endpoint: Sendable {
        let method: String
        let placement: HTTPPlacement
        let handler: Handler

        /// A read: answered on the server's thread.
        static func read(_ method: String, _ handler: @escaping Handler) -> Endpoint {
            Endpoint(method: method, placement: .inline, handler: handler)
        }

        /// A change: it waits for the manager's lock, so it runs on the change queue.
        static func change(_ method: String, _ handler: @escaping Handler) -> Endpoint {
            Endpoint(method: method, placement: .changeQueue, handler: handler)
        }
    }

    /// Every (route, method) the API answers, who answers it and where. `Allow` is derived
    /// from this table, so a method is allowed exactly where a handler exists.
    static let table: [Route.Kind: [Endpoint]] = [
        .health: [.read("GET", { _, _, _ in HealthResource.get() })],
        .limits: [
            .read("GET", { x, _, _ in LimitsResource.get(x.manager) }),
            .change("PUT", { x, _, r in try LimitsResource.put(x.manager, r) }),
        ],
        .devices: [
            .read("GET", { x, _, _ in DevicesResource.list(x.manager) }),
            .change("POST", { x, _, r in try DevicesResource.create(x.manager, r) }),
        ],
        .device: [
            .read("GET", { x, route, _ in try DevicesResource.get(x.manager, route.device!) }),
            .change("PATCH", { x, route, r in try DevicesResource.patch(x.manager, route.device!, r) }),
            .change("DELETE", { x, route, r in try DevicesResource.delete(x.manager, route.device!, r) }),
        ],
        .queues: [
            .read("GET", { x, route, _ in try QueuesResource.list(x.manager, route.device!) }),
            .change("POST", { x, route, r in try QueuesResource.add(x.manager, route.device!, r) }),
        ],
        .queue: [
            .read("GET", { x, route, _ in try QueuesResource.get(x.manager, route.device!, route.queueID!) }),
            .change("PATCH", { x, route, r in try QueuesResource.patch(x.manager, route.device!, route.queueID!, r) }),
            .change("DELETE", { x, route, _ in try QueuesResource.delete(x.manager, route.device!, route.queueID!) }),
        ],
        .stats: [.read("GET", { x, route, _ in try StatsResource.get(x.manager, route.device!) })],
        .leases: [
            .read("GET", { x, route, _ in try LeasesResource.list(x.manager, route.device!) }),
            .change("POST", { x, route, r in try LeasesResource.take(x.manager, x.leaseWatcher, route.device!, r) }),
        ],
        .lease: [.change("DELETE", { x, route, _ in try LeasesResource.revoke(x.manager, route.device!, route.leaseID!) })],
        .events: [.read("GET", { x, _, r in try EventsResource.get(x.manager, x.events, r) })],
        .metrics: [.read("GET", { x, _, _ in MetricsResource.get(x.manager) })],
        .spec: [.read("GET", { _, _, _ in SpecResource.get() })],
    ]

    /// HEAD is answered wherever GET is (the same headers, no body).
    static func methods(of kind: Route.Kind) -> [String] {
        table[kind, default: []].flatMap { $0.method == "GET" ? ["GET", "HEAD"] : [$0.method] }
    }

    /// Where `r`'s handler runs, as the table says; a request the table has no handler for
    /// is refused at once, on the server's thread.
    public func placement(of r: HTTPRequest) -> HTTPPlacement {
        guard let route = Route(path: r.path) else { return .inline }
        return Self.endpoint(route.kind, r.method)?.placement ?? .inline
    }

    /// The table's endpoint for a method; HEAD is answered by GET's.
    static func endpoint(_ kind: Route.Kind, _ method: String) -> Endpoint? {
        let wanted = method == "HEAD" ? "GET" : method
        return table[kind]?.first { $0.method == wanted }
    }

    private func dispatch(_ r: HTTPRequest) throws -> HTTPResponse {
        // Before anything else, /v1/health and /metrics included: over TCP, no token, no answer.
        guard mayCall(r.transport, authorization: r.headers["authorization"], token: token) else {
            throw APIError.unauthorized
        }
        guard let route = Route(path: r.path) else { throw APIError.notFound("no such path: \(r.path)") }
        guard let handler = Self.endpoint(route.kind, r.method)?.handler else {
            throw APIError.methodNotAllowed(r.method, allow: Self.methods(of: route.kind))
        }
        var request = r
        if r.method == "HEAD" {
            // GET's answer, whose body the server leaves out; a stream is answered as the
            // kept events are, so a HEAD never waits for one.
            request.method = "GET"
            if route.kind == .events { request.query["follow"] = "false" }
        }
        if ["POST", "PUT", "PATCH"].contains(r.method) && !r.body.isEmpty && !Self.isJSON(r.contentType) {
            throw APIError.unsupportedMediaType(r.contentType)
        }
        return try handler(self, route, request)
    }

    /// `application/json`, with or without parameters (`; charset=utf-8`).
    static func isJSON(_ contentType: String?) -> Bool {
        guard let ct = contentType else { return false }
        let media = ct.split(separator: ";", maxSplits: 1).first.map(\.trimmingWhitespace) ?? ""
        return media.lowercased() == "application/json"
    }
}
