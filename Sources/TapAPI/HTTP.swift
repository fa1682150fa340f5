import TapCore
import TapJSON
import TunKit
/// An HTTP request as the router sees it: already complete, body included.
public struct HTTPRequest: Sendable {
    public var method: String
    /// The path, percent-decoded, without the query string.
    public var path: String
    /// Lower-cased header names.
    public var headers: [String: String]
    public var body: [UInt8]
    /// Every query parameter, percent-decoded (the first of a repeated one); the router reads
    /// those it knows.
    public var query: [String: String]
    /// How the client is connected.
    public var transport: Transport
    /// `HTTP/1.1` or `HTTP/1.0`.
    public var version: String

    /// A Unix socket (with the peer's credentials, from SO_PEERCRED at accept) or TCP.
    public enum Transport: Sendable, Equatable {
        case unix(Peer?)
        case tcp
    }

    public init(method: String, path: String, headers: [String: String] = [:], body: [UInt8] = [],
                query: [String: String] = [:], transport: Transport = .unix(nil), version: String = "HTTP/1.1") {
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.query = query
        self.transport = transport
        self.version = version
    }

    public var contentType: String? { headers["content-type"] }

    /// Whether the request asks to switch to `protocolName` (`Connection: Upgrade`,
    /// `Upgrade: protocolName`), as HTTP/1.1 allows; tokens compared without case, as clients
    /// spell them either way.
    public func asksUpgrade(to protocolName: String) -> Bool {
        guard version == "HTTP/1.1",
              let connection = headers["connection"], let upgrade = headers["upgrade"] else { return false }
        let tokens = connection.split(separator: ",").map { $0.trimmingWhitespace.lowercased() }
        let wanted = protocolName.lowercased()
        return tokens.contains("upgrade") && upgrade.split(separator: ",").map { $0.trimmingWhitespace.lowercased() }.contains(wanted)
    }
}

/// Where the server runs a request's handler.
public enum HTTPPlacement: Sendable {
    /// On the server's own thread: the handler waits for no lock a change holds.
    case inline
    /// On the server's change queue, with the connection suspended meanwhile, so the thread
    /// goes on serving its other connections: the handler may wait for the manager's lock.
    case changeQueue
}

/// What `StreamBody.read` found.
public enum StreamRead: Sendable, Equatable {
    /// This many bytes were copied.
    case bytes(Int)
    /// Nothing yet: the server waits (the connection suspended) until `onReady` is called.
    case waiting
    /// The end: the chunked body is closed cleanly.
    case end
    /// Cut off (a watcher that fell too far behind): the connection is dropped.
    case abort
}

/// A response body produced over time (an event stream). The server reads it when the client
/// can take more, waits while it has nothing, and tells it when the client is gone.
public protocol StreamBody: AnyObject, Sendable {
    func read(into buffer: UnsafeMutableRawBufferPointer) -> StreamRead
    /// The server's wake-up, to call whenever bytes (or the end) become available.
    func onReady(_ wake: @escaping @Sendable () -> Void)
    /// The server stops: end the body at the next read.
    func finish()
    /// The client is gone or the body ended: stop producing.
    func close()
}

/// A switch of the connection to another protocol after a 101: what to run on the raw
/// connection once the 101 head is sent, and what to undo if that never happens (the client
/// went first).
public struct Upgrade: Sendable {
    public let protocolName: String
    public let run: @Sendable (UpgradedConnection) -> Void
    public let abandon: @Sendable () -> Void

    public init(protocolName: String, run: @escaping @Sendable (UpgradedConnection) -> Void,
                abandon: @escaping @Sendable () -> Void) {
        self.protocolName = protocolName
        self.run = run
        self.abandon = abandon
    }
}

public struct HTTPResponse: Sendable, Equatable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: [UInt8]
    /// For an error response made by `APIError`: its code and errno, carried for the request
    /// log so that nothing parses the body back.
    public var errorInfo: (code: String, errno: String?)?
    /// For a 101: what the connection becomes.
    public var upgrade: Upgrade?
    /// A body written as it is produced (chunked), instead of `body`.
    public var stream: (any StreamBody)?

    public init(status: Int, headers: [(String, String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// `101 Switching Protocols` to `upgrade.protocolName`.
    public static func switching(_ upgrade: Upgrade) -> HTTPResponse {
        var r = HTTPResponse(status: 101, headers: [("Upgrade", upgrade.protocolName)])
        r.upgrade = upgrade
        return r
    }

    /// A JSON body, ending in a newline (so a terminal's prompt starts on a line of its own).
    public static func json(_ status: Int, _ value: JSON, headers: [(String, String)] = []) -> HTTPResponse {
        HTTPResponse(status: status, headers: [("Content-Type", "application/json")] + headers,
                     body: value.serialized() + [10])
    }

    public static func text(_ status: Int, _ text: String, contentType: String) -> HTTPResponse {
        HTTPResponse(status: status, headers: [("Content-Type", contentType)], body: Array(text.utf8))
    }

    public static let noContent = HTTPResponse(status: 204)

    public func header(_ name: String) -> String? {
        headers.first { $0.0.lowercased() == name.lowercased() }?.1
    }

    public var json: JSON? { try? JSON.parse(body) }


    public static func == (a: HTTPResponse, b: HTTPResponse) -> Bool {
        a.status == b.status && a.body == b.body && a.headers.map { "\($0.0):\($0.1)" } == b.headers.map { "\($0.0):\($0.1)" }
    }
}
