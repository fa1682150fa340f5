import Dispatch
import Synchronization
import TunKit

/// An HTTP/1.1 server on libmicrohttpd (wrapped in MHD.swift), serving one listening socket.
///
/// MHD runs `threads` epoll threads (one MHD daemon each, on the same socket; whichever wakes
/// first accepts, so a burst of connections may all land on one). Reads are handled on them;
/// a request whose placement is `.changeQueue` (a change, which waits for the manager's
/// lock) runs on a queue of its own with its connection suspended, so a read or a health
/// check on the same thread never waits behind it. A slow client holds
/// only its own connection, and not for long: `ConnectionWatch` bounds the time a request may
/// take to arrive and cuts the slowest when connections near the limit.
public final class HTTPServer: Sendable {
    public struct Limits: Sendable {
        /// Largest request body; a larger one gets 413 as soon as it is known to be larger.
        public var bodyBytes = 64 * 1024
        /// Per-connection memory for the request line and headers; past it MHD answers 431.
        public var connectionMemory = 128 * 1024
        public var connections = 256
        /// Upgraded (lease) connections, on top of `connections`: a live lease never takes a
        /// slot the API needs. The manager refuses leases past its own limit.
        public var leaseConnections = 1024
        /// Past this many connections, those whose request has been arriving the longest
        /// are cut, so that new ones find room.
        public var connectionsRoom = 192
        /// How long a request may take to arrive, headers and body, from the moment it may
        /// begin (the connection opened, or the previous answer was sent).
        public var requestSeconds = 10.0
        public var idleTimeoutSeconds = 30
        public var threads = 2

        public init() {}
    }

    public typealias Handler = @Sendable (HTTPRequest) -> HTTPResponse
    /// Where a request's handler runs; the router's table says, route by route.
    public typealias Placement = @Sendable (HTTPRequest) -> HTTPPlacement

    /// The answers the server gives by itself, made by the API so that their body is the
    /// API's error format.
    public struct Refusals: Sendable {
        /// The body is larger than the limit (413).
        public var tooLarge: @Sendable (_ limit: Int) -> HTTPResponse
        /// The server is stopping and takes no new request (503).
        public var stopping: HTTPResponse
        /// The request is malformed in a way the handler never sees (400): the message says how.
        public var badRequest: @Sendable (_ message: String) -> HTTPResponse
        /// Asked as soon as the headers are in, before any body is read: a refusal (401 for a
        /// TCP request without the token), or nil to go on. So a client that may not call is
        /// never told more (a 413) than that.
        public var admit: @Sendable (_ transport: HTTPRequest.Transport, _ authorization: String?) -> HTTPResponse?

        public init(tooLarge: @escaping @Sendable (Int) -> HTTPResponse, stopping: HTTPResponse,
                    badRequest: @escaping @Sendable (String) -> HTTPResponse,
                    admit: @escaping @Sendable (HTTPRequest.Transport, String?) -> HTTPResponse?) {
            self.tooLarge = tooLarge
            self.stopping = stopping
            self.badRequest = badRequest
            self.admit = admit
        }
    }

    /// Requests handled whose answer MHD has not finished sending, those of them whose handler
    /// still runs, and whether the server stops: in one lock, so that no request starts once
    /// a stop has counted them. A stop waits on it for the counts to fall.
    final class Answering: Sendable {
        private struct State {
            var count = 0
            var handling = 0
            var stopping = false
        }
        private let state = Monitor(State())

        /// False once the server stops: the request is refused, unhandled.
        func begin() -> Bool {
            state.withLock { s in
                guard !s.stopping else { return false }
                s.count += 1
                s.handling += 1
                return true
            }
        }

        /// The handler returned (its response is queued or about to be).
        func handled() { state.withLock { $0.handling -= 1 } }

        /// Work on the change queue for a connection MHD still serves (a lease's hand-over or
        /// its end): counted like a handler, stopping or not, so MHD does not stop under it.
        func countWork() { state.withLock { $0.handling += 1 } }

        /// From now on every new request is refused, unhandled.
        func refuse() { state.withLock { $0.stopping = true } }

        /// MHD is done with the response.
        func end() { state.withLock { $0.count -= 1 } }

        /// Waits for every handler that runs, and every lease hand-over on the change queue: a
        /// change is never cut short, and MHD must not stop with a connection suspended for one.
        func waitForHandlers() { state.wait(until: { $0.handling == 0 }) }

        /// Waits (up to `seconds`) for the answers of the requests handled to be sent.
        func waitForAnswers(within seconds: Double) { state.wait(until: { $0.count == 0 }, within: seconds) }
    }

    private let core: ServerCore
    /// One MHD daemon per thread, each with one thread and its own copy of the socket (MHD
    /// closes the copy when it stops). Not MHD's thread pool: its stop shuts the listening
    /// socket itself down, for every holder (systemd's socket-activation copy too), and its
    /// quiesce races the pool's threads and aborts (libmicrohttpd 0.9.75, daemon.c:5531).
    /// Taken out once, by whichever thread stops the server.
    private let daemons: Mutex<[MHDDaemon]>
    /// The socket served: closed by its owner once every daemon has stopped.
    private let socket: Mutex<ListeningSocket?>

    /// Serves `socket`, which the server then owns. `placement` says where each request's
    /// handler runs; `refusals` are the answers the server gives by itself. On failure the
    /// socket is closed.
    public init(socket: consuming ListeningSocket, limits: Limits = Limits(), handler: @escaping Handler,
                placement: @escaping Placement, refusals: Refusals) throws(HTTPServerError) {
        let watch: ConnectionWatch
        do {
            watch = try ConnectionWatch(requestSeconds: limits.requestSeconds, room: limits.connectionsRoom)
        } catch {
            throw HTTPServerError.startFailed(errno: error.errno)
        }
        core = ServerCore(handler: handler, placement: placement, limits: limits, refusals: refusals, watch: watch)
        let threads = max(1, limits.threads)
        var started: [MHDDaemon] = []
        do throws(HTTPServerError) {
            for i in 0..<threads {
                // The connection limit is the listener's: shared out among the threads.
                // Any thread may take every lease: each has room for all of them.
                let share = limits.connections / threads + (i < limits.connections % threads ? 1 : 0)
                    + limits.leaseConnections
                let copy: Int32
                do { copy = try socket.copy() } catch { throw .startFailed(errno: error.errno) }
                do {
                    started.append(try MHDDaemon.start(socket: copy, core: core, connections: share,
                                                       idleSeconds: limits.idleTimeoutSeconds,
                                                       connectionMemory: limits.connectionMemory))
                } catch {
                    // MHD closes the copy on some of its start failures and not others.
                    socket.closeCopyIfOpen(copy)
                    throw .startFailed(errno: error.errno)
                }
            }
        } catch {
            for d in started { d.stop() }
            watch.stop()
            throw error
        }
        daemons = Mutex(started)
        self.socket = Mutex(socket)
    }

    deinit { stop() }

    /// Refuses every new request (503, unhandled) from now on; `stop` does the rest. For a
    /// daemon with several servers: all refuse at once, then each stops.
    public func refuse() {
        core.answering.refuse()
    }

    /// Refuses new requests, lets those in flight finish and be answered, stops every thread,
    /// then closes the socket. Idempotent.
    public func stop() {
        core.answering.refuse()
        let all = daemons.withLock { d in
            defer { d = [] }
            return d
        }
        guard !all.isEmpty else { return }
        // MHD accepts until it stops (there is no safe quiesce, see `daemons`): every new
        // request meanwhile is refused (503) unhandled.
        // Streams end with their last chunk (and no connection stays suspended).
        core.streams.finishAll(within: 2)
        // Changes and lease hand-overs under way finish; requests that come meanwhile are
        // refused unhandled.
        core.answering.waitForHandlers()
        // Upgraded connections are the application's to close, and only before MHD stops.
        core.connections.closeAll()
        // A request already handled has changed what it changed: its answer goes out before
        // MHD closes the connection (bounded, for a client that does not read).
        core.answering.waitForAnswers(within: 5)
        core.answering.waitForHandlers()
        for d in all { d.stop() }
        core.watch.stop()
        let owner = socket.withLock { $0.take() }
        _ = consume owner
    }
}

/// What MHD's callbacks reach (MHD.swift): the server's settings and the state its requests
/// share. Its request, stream and upgrade steps are in HTTPExchange.swift, HTTPStreams.swift
/// and HTTPUpgrades.swift.
final class ServerCore: Sendable {
    let handler: HTTPServer.Handler
    let placement: HTTPServer.Placement
    let limits: HTTPServer.Limits
    let refusals: HTTPServer.Refusals
    /// A stop waits for these, so a change that was committed is answered.
    let answering = HTTPServer.Answering()
    let watch: ConnectionWatch
    let connections = UpgradedConnections()
    let streams = Streams()
    /// Where changes run, off MHD's threads: a change waits for the manager's lock, and a
    /// read or a health check on another connection of the same MHD thread must not wait
    /// behind it.
    let changes = DispatchQueue(label: "mqtapd-http-changes")

    init(handler: @escaping HTTPServer.Handler, placement: @escaping HTTPServer.Placement, limits: HTTPServer.Limits,
         refusals: HTTPServer.Refusals, watch: ConnectionWatch) {
        self.handler = handler
        self.placement = placement
        self.limits = limits
        self.refusals = refusals
        self.watch = watch
    }

    /// A connection opened: it is watched from now on.
    func connectionStarted(fd: Int32) -> ConnectionWatch.Entry {
        let e = ConnectionWatch.Entry(fd: fd)
        // The API's connections have a cap of their own (MHD's limit has room for leases
        // too): past it, the one whose request has been arriving the longest makes room.
        watch.add(e, cap: limits.connections)
        return e
    }

    func connectionClosed(_ e: ConnectionWatch.Entry) { watch.remove(e) }

    /// Runs `work` on the change queue, counted so that MHD does not stop under it.
    func onChangeQueue(_ work: @escaping @Sendable () -> Void) {
        answering.countWork()
        changes.async {
            work()
            self.answering.handled()
        }
    }
}

public enum HTTPServerError: Error, Sendable, CustomStringConvertible {
    /// MHD refused to start (it logs why on stderr); the errno it left, if any.
    case startFailed(errno: Errno?)

    public var description: String {
        switch self {
        case .startFailed(let e): return "the HTTP server did not start" + (e.map { " (\($0.name): \($0.message))" } ?? "")
        }
    }
}
