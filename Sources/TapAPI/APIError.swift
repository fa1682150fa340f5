import TapCore
import TapJSON

/// Every error the API answers with. This file is the one place that chooses the HTTP status
/// and `code` for an error, including every manager error.
public struct APIError: Error, Sendable, Equatable {
    public let status: Int
    public let code: String
    public let message: String
    public var field: String?
    public var errno: String?
    /// For 405: the methods the path does allow.
    public var allow: [String]?
    /// Extra headers (426: what to upgrade to).
    public var headers: [(String, String)] = []

    init(_ status: Int, _ code: String, _ message: String, field: String? = nil, errno: String? = nil) {
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.errno = errno
    }

    static func invalidJSON(_ e: JSON.ParseError) -> APIError {
        APIError(400, "invalid_json", "line \(e.line), column \(e.column): \(e.message)")
    }
    static func invalidJSON(_ message: String) -> APIError { APIError(400, "invalid_json", message) }
    static func unknownField(_ field: String) -> APIError {
        APIError(400, "unknown_field", "unknown field \(field)", field: field)
    }
    static func invalidField(_ field: String, _ reason: String) -> APIError {
        APIError(400, "invalid_field", "\(field): \(reason)", field: field)
    }
    static func notFound(_ message: String) -> APIError { APIError(404, "not_found", message) }
    static func methodNotAllowed(_ method: String, allow: [String]) -> APIError {
        var e = APIError(405, "method_not_allowed", "\(method) is not allowed here; allowed: \(allow.joined(separator: ", "))")
        e.allow = allow
        return e
    }
    static func unsupportedMediaType(_ got: String?) -> APIError {
        APIError(415, "unsupported_media_type",
                 "the body must be application/json" + (got.map { ", not \($0)" } ?? " (Content-Type is missing)"))
    }
    /// An error no case above describes: a bug, reported as such rather than hidden.
    static func internalError(_ error: any Error) -> APIError {
        APIError(500, "internal_error", "unexpected error: \(error)")
    }

    /// Over TCP: no credentials, no answer.
    static let unauthorized: APIError = {
        var e = APIError(401, "unauthorized", "a TCP request needs Authorization: Bearer TOKEN (the daemon's --token-file)")
        e.headers = [("WWW-Authenticate", "Bearer realm=\"mqtapd\"")]
        return e
    }()

    /// What only the Unix socket carries (a lease's fds) was asked over TCP.
    static func unixSocketRequired(_ what: String) -> APIError {
        APIError(400, "unix_socket_required", "\(what), which only a Unix socket carries; connect to the daemon's Unix socket")
    }

    /// The request must switch the connection to `protocolName`.
    static func upgradeRequired(_ protocolName: String) -> APIError {
        var e = APIError(426, "upgrade_required",
                         "this is an HTTP/1.1 upgrade: send Connection: Upgrade and Upgrade: \(protocolName)")
        e.headers = [("Upgrade", protocolName), ("Connection", "Upgrade")]
        return e
    }

    static func eventsExpired(since: UInt64, oldest: UInt64) -> APIError {
        APIError(410, "events_expired",
                 "events after \(since) are gone: the oldest kept is \(oldest) (--event-retention); start again without since")
    }

    /// A server-wide bound on long-lived connections (event streams) was reached.
    static func tooMany(_ what: String, limit: Int) -> APIError {
        APIError(503, "resource_exhausted", "too many \(what) (\(limit)); try again later")
    }

    public static func payloadTooLarge(limit: Int) -> APIError {
        APIError(413, "payload_too_large", "the body is larger than \(limit) bytes")
    }

    /// What the HTTP server answers by itself, in the API's error format; over TCP, nothing but
    /// 401 without `token`.
    public static func serverRefusals(token: BearerToken?) -> HTTPServer.Refusals {
        HTTPServer.Refusals(
            tooLarge: { payloadTooLarge(limit: $0).response },
            stopping: APIError(.shuttingDown).response,
            badRequest: { APIError(400, "bad_request", $0).response },
            admit: { transport, authorization in
                mayCall(transport, authorization: authorization, token: token) ? nil : unauthorized.response
            })
    }

    /// The mapping of manager errors: by kind, not by message.
    init(_ e: ManagerError) {
        let errno = e.errno?.name
        switch e {
        case .invalidField(let field, _):
            self.init(400, "invalid_field", e.message, field: field)
        case .deviceNotFound, .queueNotFound:
            self.init(404, "not_found", e.message)
        case .leasedQueueNotFound:
            self.init(404, "not_found", e.message, field: "queues")
        case .nameConflict:
            self.init(409, "name_conflict", e.message, field: "name", errno: errno)
        case .queueLimitExceeded(_, _, _, _, let field):
            self.init(409, "queue_limit_exceeded", e.message, field: field, errno: errno)
        case .aboveGlobalLimit(let field, _, _):
            self.init(409, "queue_limit_exceeded", e.message, field: field)
        case .limitBelowUsage(let field, _, _, _):
            self.init(409, "limit_below_usage", e.message, field: field)
        case .lastQueue:
            self.init(409, "last_queue", e.message)
        case .resourceExhausted:
            self.init(503, "resource_exhausted", e.message, errno: errno)
        case .deviceNotActive:
            self.init(409, "device_not_active", e.message)
        case .featureMissing(_, let field):
            if let field {
                self.init(400, "feature_unsupported", e.message, field: field)
            } else {
                self.init(500, "feature_unsupported", e.message)
            }
        case .shuttingDown:
            self.init(503, "shutting_down", e.message)
        case .queueLeased(_, _, _):
            self.init(409, "queue_leased", e.message)
        case .deviceLeased:
            self.init(409, "device_leased", e.message)
        case .leaseNotFound:
            self.init(404, "not_found", e.message)
        case .notEnoughQueues:
            self.init(409, "not_enough_queues", e.message, field: "enabled_queues")
        case .peerUnavailable:
            self.init(409, "peer_unavailable", e.message, field: "peer")
        case .peerMismatch(let field, _):
            self.init(409, "peer_mismatch", e.message, field: field)
        case .queuesHeld:
            self.init(409, "queues_held", e.message)
        case .deviceForwarding(_, _, let field):
            self.init(409, "device_forwarding", e.message, field: field)
        case .leaseLimit:
            self.init(409, "lease_limit", e.message)
        case .netnsNotFound:
            self.init(404, "not_found", e.message, field: "netns")
        case .notMultiQueue:
            self.init(409, "not_multi_queue", e.message, field: "queues")
        case .cannotRevoke:
            self.init(409, "not_multi_queue", e.message)
        case .consumerConflict:
            self.init(409, "consumer_conflict", e.message)
        case .stateNotSaved:
            self.init(503, "resource_exhausted", e.message, errno: errno)
        case .kernel:
            self.init(500, "kernel_error", e.message, errno: errno)
        }
    }

    public static func == (a: APIError, b: APIError) -> Bool {
        a.status == b.status && a.code == b.code && a.message == b.message && a.field == b.field && a.errno == b.errno
            && a.allow == b.allow && a.headers.map { "\($0.0):\($0.1)" } == b.headers.map { "\($0.0):\($0.1)" }
    }

    public var body: JSON {
        var error: JSONObject = ["code": .string(code), "message": .string(message)]
        if let field { error["field"] = .string(field) }
        if let errno { error["errno"] = .string(errno) }
        return ["error": .object(error)]
    }

    public var response: HTTPResponse {
        var headers: [(String, String)] = []
        if let allow { headers.append(("Allow", allow.joined(separator: ", "))) }
        headers += self.headers
        var r = HTTPResponse.json(status, body, headers: headers)
        r.errorInfo = (code, errno)
        return r
    }
}
