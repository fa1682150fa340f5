import CMicroHTTPD
import Dispatch
import Synchronization
import TunKit

/// An HTTP/1.1 server on libmicrohttpd, serving one listening socket. This file is the only
/// importer of the C module.
///
/// MHD runs `threads` epoll threads (one MHD daemon each, on the same socket; whichever wakes
/// first accepts, so a burst of connections may all land on one). Reads are handled on them;
/// a change (which
/// waits for the manager's lock) runs on a queue of its own with its connection suspended, so
/// a read or a health check on the same thread never waits behind it. A slow client holds
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
    /// a stop has counted them.
    final class Answering: Sendable {
        private struct State {
            var count = 0
            var handling = 0
            var stopping = false
        }
        private let state = Mutex(State())

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
        func aside() { state.withLock { $0.handling += 1 } }

        /// From now on every new request is refused, unhandled.
        func refuse() { state.withLock { $0.stopping = true } }

        /// MHD is done with the response.
        func end() { state.withLock { $0.count -= 1 } }

        /// Waits for every handler that runs, and every lease hand-over on the change queue: a
        /// change is never cut short, and MHD must not stop with a connection suspended for one.
        func waitForHandlers() {
            while state.withLock({ $0.handling > 0 }) { Clock.sleep(0.005) }
        }

        /// Waits (up to `seconds`) for the answers of the requests handled to be sent.
        func waitForAnswers(within seconds: Double) {
            let deadline = Clock.monotonicNanoseconds() + UInt64(seconds * 1e9)
            while state.withLock({ $0.count > 0 }) && Clock.monotonicNanoseconds() < deadline { Clock.sleep(0.005) }
        }
    }

    /// What the C callbacks reach through their `cls` pointer.
    private final class Context: Sendable {
        let handler: Handler
        let limits: Limits
        let refusals: Refusals
        let connections: Connections
        let streams: Streams
        /// A stop waits for these, so a change that was committed is answered.
        let answering = Answering()
        let watch: ConnectionWatch
        /// Where changes run, off MHD's threads: a change waits for the manager's lock, and a
        /// read or a health check on another connection of the same MHD thread must not wait
        /// behind it.
        let changes = DispatchQueue(label: "mqtapd-http-changes")

        init(handler: @escaping Handler, limits: Limits, refusals: Refusals,
             connections: Connections, streams: Streams, watch: ConnectionWatch) {
            self.watch = watch
            self.handler = handler
            self.limits = limits
            self.refusals = refusals
            self.connections = connections
            self.streams = streams
        }
    }

    /// One request's upload, kept across the access handler's calls for that request.
    private final class Upload: @unchecked Sendable {
        // SAFETY (@unchecked): used on the MHD thread that serves the connection, except
        // `response`, written by the change queue while the connection is suspended and read
        // by MHD's thread after MHD_resume_connection (whose lock orders the two).
        var body: [UInt8] = []
        /// A response was queued early (413, 400); the rest of the upload is discarded.
        var answered = false
        /// The body went past the limit: the rest is discarded, and 413 answers at its end.
        var tooLarge = false
        var transport = HTTPRequest.Transport.tcp
        /// A 101 was queued: run on the raw connection once MHD has sent the head, or
        /// abandoned in `completed` if it never was.
        var upgrade: Upgrade?
        /// Counted in the context's `answering` until `completed`.
        var answering = false
        /// A change handled on the change queue: its response, once there.
        var response: HTTPResponse?
        /// For a 101: where the hand-over (or its abandon) runs, off MHD's threads, since it
        /// waits for the manager's lock.
        weak var context: Context?
        var dispatched = false
    }

    /// The query parameters requests may carry; others are ignored.
    public static let queryKeys = ["force", "since", "follow", "device"]

    /// A streamed response in flight: its body, its connection (suspended while the body has
    /// nothing to give), and whether it is suspended. Retained for MHD in `queueStream`,
    /// released in `streamDone`.
    final class Streaming: @unchecked Sendable {
        // SAFETY (@unchecked): `connection` is MHD's; it is suspended only from MHD's reader
        // callback and resumed from anywhere, both under `state`'s lock, so a resume never
        // comes for a connection that is not suspended (which MHD forbids).
        let body: any StreamBody
        let connection: OpaquePointer
        private struct State {
            var suspended = false
            /// A wake came since the reader last looked.
            var pending = false
            var done = false
        }
        private let state = Mutex(State())
        weak var registry: Streams?

        init(_ body: any StreamBody, _ connection: OpaquePointer) {
            self.body = body
            self.connection = connection
        }

        /// Called by the body's producer: resumes the connection if it waits.
        func wake() {
            state.withLock { s in
                s.pending = true
                if s.suspended && !s.done {
                    s.suspended = false
                    MHD_resume_connection(connection)
                }
            }
        }

        /// On MHD's thread, in the reader callback.
        func read(_ buffer: UnsafeMutableRawBufferPointer) -> Int {
            state.withLock { $0.pending = false }
            switch body.read(into: buffer) {
            case .bytes(let n): return n
            case .end: return -1  // MHD_CONTENT_READER_END_OF_STREAM
            case .abort: return -2  // MHD_CONTENT_READER_END_WITH_ERROR
            case .waiting:
                state.withLock { s in
                    // A wake between the read and here: look again instead of sleeping.
                    if s.pending || s.done { return }
                    s.suspended = true
                    MHD_suspend_connection(connection)
                }
                return 0
            }
        }

        /// MHD is done with the response (the client went, or the body ended).
        func finished() {
            state.withLock { $0.done = true }
            body.close()
            registry?.remove(self)
        }
    }

    /// The streams in flight, ended before MHD stops (MHD must not stop with a suspended
    /// connection).
    final class Streams: Sendable {
        private struct State {
            var open: [ObjectIdentifier: Streaming] = [:]
            var stopping = false
        }
        private let state = Mutex(State())

        /// Registers a stream; once the server stops, a new one is finished at once (its
        /// first read ends it), so no connection is ever suspended when MHD stops.
        func add(_ s: Streaming) {
            let stopping = state.withLock { st in
                st.open[ObjectIdentifier(s)] = s
                return st.stopping
            }
            if stopping { s.body.finish() }
        }

        func remove(_ s: Streaming) { state.withLock { _ = $0.open.removeValue(forKey: ObjectIdentifier(s)) } }

        /// Ends every stream (and any that comes later) and waits (up to `seconds`) for MHD to
        /// send their last chunk.
        func finishAll(within seconds: Double) {
            let all = state.withLock { st in
                st.stopping = true
                return Array(st.open.values)
            }
            for s in all {
                s.body.finish()
                s.wake()
            }
            let deadline = Clock.monotonicNanoseconds() + UInt64(seconds * 1e9)
            while state.withLock({ !$0.open.isEmpty }) && Clock.monotonicNanoseconds() < deadline { Clock.sleep(0.01) }
        }
    }

    /// The upgraded connections still open: closed before MHD stops (after MHD_stop_daemon
    /// their handles are freed, so nothing may close them then).
    final class Connections: Sendable {
        private struct State {
            var open: [ObjectIdentifier: UpgradedConnection] = [:]
            var stopped = false
        }
        private let state = Mutex(State())

        /// False once the server stops: the caller closes the connection at once. Checked and
        /// added in one step, so no connection slips past `closeAll`.
        func add(_ c: UpgradedConnection) -> Bool {
            let added = state.withLock { st -> Bool in
                guard !st.stopped else { return false }
                st.open[ObjectIdentifier(c)] = c
                return true
            }
            if added { c.onClose { [weak self] in self?.state.withLock { _ = $0.open.removeValue(forKey: ObjectIdentifier(c)) } } }
            return added
        }

        func closeAll() {
            let all = state.withLock { st in
                st.stopped = true
                defer { st.open = [:] }
                return Array(st.open.values)
            }
            for c in all { c.close() }
        }
    }

    private let context: Context
    /// One MHD daemon per thread, each with one thread and its own copy of the socket (MHD
    /// closes the copy when it stops). Not MHD's thread pool: its stop shuts the listening
    /// socket itself down, for every holder (systemd's socket-activation copy too), and its
    /// quiesce races the pool's threads and aborts (libmicrohttpd 0.9.75, daemon.c:5531).
    // SAFETY: the daemon pointers are set once in init and taken once in stop under the
    // mutex; MHD_stop_daemon is called once for each, from whichever thread stops the server.
    private let daemons: Mutex<[OpaquePointer]>
    /// The socket served: closed by its owner once every daemon has stopped.
    private let socket: Mutex<ListeningSocket?>
    private let connections = Connections()
    private let streams = Streams()

    /// Serves `socket`, which the server then owns. `refusals` are the answers the server
    /// gives by itself. On failure the socket is closed.
    public init(socket: consuming ListeningSocket, limits: Limits = Limits(), handler: @escaping Handler,
                refusals: Refusals) throws(HTTPServerError) {
        let watch: ConnectionWatch
        do {
            watch = try ConnectionWatch(requestSeconds: limits.requestSeconds, room: limits.connectionsRoom)
        } catch {
            throw HTTPServerError.startFailed(errno: error.errno)
        }
        context = Context(handler: handler, limits: limits, refusals: refusals, connections: connections,
                          streams: streams, watch: watch)
        // SAFETY: `context` is owned by this server and outlives the daemons: `stop()` (also
        // run by deinit) stops them, and with them every callback, before it is released.
        let cls = Unmanaged.passUnretained(context).toOpaque()
        let threads = max(1, limits.threads)
        var started: [OpaquePointer] = []
        for i in 0..<threads {
            // The connection limit is the listener's: shared out among the threads.
            // Any thread may take every lease: each has room for all of them.
            let share = limits.connections / threads + (i < limits.connections % threads ? 1 : 0) + limits.leaseConnections
            var err: Int32 = 0
            var d: OpaquePointer?
            do {
                let copy = try socket.copy()
                // SAFETY: the copy is MHD's from here: it closes it in MHD_stop_daemon, or on
                // some of its start failures, after which only a copy still open is closed.
                d = mqt_mhd_start(copy, HTTPServer.access, cls, HTTPServer.completed, cls, HTTPServer.notify, cls,
                                  UInt32(share), UInt32(limits.idleTimeoutSeconds), limits.connectionMemory, &err)
                if d == nil { socket.closeCopyIfOpen(copy) }
            } catch {
                err = error.errno.rawValue
            }
            guard let d else {
                for d in started { MHD_stop_daemon(d) }
                watch.stop()
                throw HTTPServerError.startFailed(errno: err == 0 ? nil : Errno(err))
            }
            started.append(d)
        }
        daemons = Mutex(started)
        self.socket = Mutex(socket)
    }

    deinit { stop() }

    /// Refuses every new request (503, unhandled) from now on; `stop` does the rest. For a
    /// daemon with several servers: all refuse at once, then each stops.
    public func refuse() {
        context.answering.refuse()
    }

    /// Refuses new requests, lets those in flight finish and be answered, stops every thread,
    /// then closes the socket. Idempotent.
    public func stop() {
        context.answering.refuse()
        let all = daemons.withLock { d in
            defer { d = [] }
            return d
        }
        guard !all.isEmpty else { return }
        // MHD accepts until it stops (there is no safe quiesce, see `daemons`): every new
        // request meanwhile is refused (503) unhandled.
        // Streams end with their last chunk (and no connection stays suspended).
        streams.finishAll(within: 2)
        // Changes and lease hand-overs under way finish; requests that come meanwhile are
        // refused unhandled.
        context.answering.waitForHandlers()
        // Upgraded connections are the application's to close, and only before MHD stops.
        connections.closeAll()
        // A request already handled has changed what it changed: its answer goes out before
        // MHD closes the connection (bounded, for a client that does not read).
        context.answering.waitForAnswers(within: 5)
        context.answering.waitForHandlers()
        for d in all { MHD_stop_daemon(d) }
        context.watch.stop()
        let owner = socket.withLock { $0.take() }
        _ = consume owner
    }

    // MARK: C callbacks

    private static let access: MHD_AccessHandlerCallback = { cls, connection, url, method, version, uploadData, uploadSize, conCls in
        // SAFETY: `cls` is the Context passed unretained in init; it outlives the daemon.
        let context = Unmanaged<Context>.fromOpaque(cls!).takeUnretainedValue()
        guard let connection, let uploadSize, let conCls else { return .NO }

        guard let state = conCls.pointee else {
            // First call for this request: headers are in, no body yet.
            let upload = Upload()
            // SAFETY: retained here, released exactly once in `completed`, which MHD calls
            // for every request whose *con_cls we set.
            conCls.pointee = Unmanaged.passRetained(upload).toOpaque()
            // Over TCP, SO_PEERCRED answers pid 0: credentials only for a Unix socket.
            let fd = mqt_mhd_connection_fd(connection)
            if fd >= 0 && UnixSocket.isUnix(fd) {
                upload.transport = .unix(try? UnixSocket.peerCredentials(fd))
            }
            if let refusal = context.refusals.admit(upload.transport, header(connection, "Authorization")) {
                upload.answered = true
                return queue(connection, closing(refusal))
            }
            // Framing that two parties could read two ways (request smuggling) is refused, and
            // the connection closed: where this request ends is not known.
            let framing = mqt_mhd_framing(connection)
            if framing.lengths_differ != 0 {
                upload.answered = true
                return queue(connection, closing(context.refusals.badRequest("two Content-Length headers with different values")))
            }
            if framing.content_lengths > 0 && framing.transfer_encoding != 0 {
                upload.answered = true
                return queue(connection, closing(context.refusals.badRequest("Content-Length and Transfer-Encoding together")))
            }
            if let length = header(connection, "Content-Length").flatMap(Int.init), length > context.limits.bodyBytes {
                upload.answered = true
                return queue(connection, closing(context.refusals.tooLarge(context.limits.bodyBytes)))
            }
            return .YES
        }
        // SAFETY: `state` is the Upload retained above; it lives until `completed`.
        let upload = Unmanaged<Upload>.fromOpaque(state).takeUnretainedValue()

        if uploadSize.pointee > 0 {
            let n = uploadSize.pointee
            uploadSize.pointee = 0  // consumed (or discarded)
            guard !upload.answered && !upload.tooLarge else { return .YES }
            if upload.body.count + n > context.limits.bodyBytes {
                // A body of no announced length (chunked) grew past the limit: the rest is
                // read and dropped, and the 413 goes out once it is in (MHD 0.9 resets a
                // chunked upload answered half-way).
                upload.tooLarge = true
                upload.body = []
                return .YES
            }
            // SAFETY: MHD guarantees `n` readable bytes at uploadData for this call only;
            // they are copied out before returning.
            upload.body.append(contentsOf: UnsafeRawBufferPointer(start: uploadData, count: n))
            return .YES
        }
        if upload.answered { return .YES }
        if upload.tooLarge {
            upload.answered = true
            return queue(connection, closing(context.refusals.tooLarge(context.limits.bodyBytes)))
        }
        if upload.dispatched {
            // Resumed: the change queue's response is there.
            guard let response = upload.response else { return .YES }
            upload.response = nil
            upload.dispatched = false
            return respond(connection, response, upload, context)
        }
        // The whole request is in: no longer timed.
        entry(of: connection)?.arrived()

        var headers: [String: String] = [:]
        for name in ["Content-Type", "Content-Length", "Accept", "Host", "Connection", "Upgrade", "Authorization"] {
            if let v = header(connection, name) { headers[name.lowercased()] = v }
        }
        var query: [String: String] = [:]
        for key in queryKeys {
            if let v = MHD_lookup_connection_value(connection, .GET_ARGUMENT_KIND, key) { query[key] = String(cString: v) }
        }
        let request = HTTPRequest(method: String(cString: method!), path: String(cString: url!),
                                  headers: headers, body: upload.body, query: query, transport: upload.transport,
                                  version: version.map { String(cString: $0) } ?? "HTTP/1.1")
        upload.body = []
        // Counted before the handler runs: a stop that begins meanwhile waits for the answer.
        // Refused with the connection closed: a keep-alive client does not come back on it.
        guard context.answering.begin() else { return queue(connection, closing(context.refusals.stopping)) }
        upload.answering = true
        if request.method != "GET" && request.method != "HEAD" {
            // A change: handled on the change queue with the connection suspended, so this
            // thread goes on serving its other connections; resumed with the response.
            upload.dispatched = true
            MHD_suspend_connection(connection)
            let suspended = SuspendedConnection(connection)
            let handler = context.handler
            context.changes.async {
                upload.response = handler(request)
                // Resumed before it counts as handled: a stop waits for `handled`, and MHD must
                // never stop with the connection still suspended.
                MHD_resume_connection(suspended.connection)
                context.answering.handled()
            }
            return .YES
        }
        let response = context.handler(request)
        context.answering.handled()
        return respond(connection, response, upload, context)
    }

    /// A connection suspended for a change, handed to the change queue to resume.
    private struct SuspendedConnection: @unchecked Sendable {
        // SAFETY (@unchecked): MHD keeps a suspended connection alive until it is resumed,
        // which is the only use made of it, once.
        let connection: OpaquePointer
        init(_ c: OpaquePointer) { connection = c }
    }

    /// Queues a handler's response: plain, streamed or a 101.
    private static func respond(_ connection: OpaquePointer, _ response: HTTPResponse, _ upload: Upload,
                                _ context: Context) -> MHD_Result {
        if response.upgrade != nil || response.stream != nil {
            // Streams and upgraded connections are ended by the stop itself.
            upload.answering = false
            context.answering.end()
        }
        if let upgrade = response.upgrade {
            upload.upgrade = upgrade
            upload.context = context
            return queueUpgrade(connection, response)
        }
        if let body = response.stream {
            return queueStream(connection, response, body, context.streams)
        }
        return queue(connection, response)
    }

    /// Queues a chunked response whose body is read from `body` as it is produced.
    private static func queueStream(_ connection: OpaquePointer, _ response: HTTPResponse, _ body: any StreamBody,
                                    _ streams: Streams) -> MHD_Result {
        let s = Streaming(body, connection)
        s.registry = streams
        // SAFETY: retained for MHD here, released once in `streamDone`, which MHD calls when it
        // no longer needs the response; if creating the response fails, released here.
        let cls = Unmanaged.passRetained(s).toOpaque()
        guard let r = mqt_mhd_response_stream(16 * 1024, HTTPServer.streamRead, cls, HTTPServer.streamDone) else {
            Unmanaged<Streaming>.fromOpaque(cls).release()
            body.close()
            return .NO
        }
        defer { MHD_destroy_response(r) }
        for (name, value) in response.headers { MHD_add_response_header(r, name, value) }
        streams.add(s)
        body.onReady { [weak s] in s?.wake() }
        return MHD_queue_response(connection, UInt32(response.status), r)
    }

    private static let streamRead: MHD_ContentReaderCallback = { cls, _, buf, max in
        // SAFETY: `cls` is the Streaming retained in `queueStream`, alive until `streamDone`;
        // MHD gives `max` writable bytes at `buf` for this call.
        let s = Unmanaged<Streaming>.fromOpaque(cls!).takeUnretainedValue()
        return s.read(UnsafeMutableRawBufferPointer(start: buf, count: max))
    }

    private static let streamDone: MHD_ContentReaderFreeCallback = { cls in
        // SAFETY: balances the passRetained of `queueStream`; MHD calls this once.
        let s = Unmanaged<Streaming>.fromOpaque(cls!).takeRetainedValue()
        s.finished()
    }

    /// Queues a 101; MHD calls `upgraded` once the head is sent.
    private static func queueUpgrade(_ connection: OpaquePointer, _ response: HTTPResponse) -> MHD_Result {
        guard let r = MHD_create_response_for_upgrade(HTTPServer.upgraded, nil) else { return .NO }
        defer { MHD_destroy_response(r) }
        // MHD adds `Connection: Upgrade` itself; the `Upgrade` header is ours to add.
        for (name, value) in response.headers { MHD_add_response_header(r, name, value) }
        return MHD_queue_response(connection, 101, r)
    }

    private static let upgraded: MHD_UpgradeHandler = { _, connection, conCls, _, _, sock, urh in
        // SAFETY: `conCls` is the Upload retained in the first access-handler call; MHD keeps
        // the request (and so the Upload, released in `completed`) alive until the upgraded
        // connection is closed, which is after this returns.
        guard let conCls, let urh else { return }
        // A lease's connection is not the API's: it leaves the watch (its slots and the room
        // it keeps for new requests are the API's alone).
        if let connection, let e = entry(of: connection) {
            Unmanaged<Upload>.fromOpaque(conCls).takeUnretainedValue().context?.watch.remove(e)
        }
        let upload = Unmanaged<Upload>.fromOpaque(conCls).takeUnretainedValue()
        guard let upgrade = upload.upgrade else { return }
        upload.upgrade = nil
        let c = UpgradedConnection(fd: Int32(sock), handle: urh)
        guard let context = upload.context, context.connections.add(c) else {
            // The server is stopping: no lease starts now.
            c.close()
            if let context = upload.context { aside(context) { upgrade.abandon() } } else { upgrade.abandon() }
            return
        }
        aside(context) {
            // Closed meanwhile by a stopping server: the lease never starts.
            guard !c.isClosed else { return upgrade.abandon() }
            upgrade.run(c)
        }
    }

    /// Runs `work` on the change queue, counted so that MHD does not stop under it.
    private static func aside(_ context: Context, _ work: @escaping @Sendable () -> Void) {
        context.answering.aside()
        context.changes.async {
            work()
            context.answering.handled()
        }
    }

    /// The watch entry of a connection, which `notify` stored as its socket context.
    private static func entry(of connection: OpaquePointer) -> ConnectionWatch.Entry? {
        // SAFETY: the context is the Entry retained in `notify` at STARTED and released there
        // at CLOSED, after the connection's last request.
        mqt_mhd_socket_context(connection).map { Unmanaged<ConnectionWatch.Entry>.fromOpaque($0).takeUnretainedValue() }
    }

    private static let notify: MHD_NotifyConnectionCallback = { cls, connection, socketContext, code in
        // SAFETY: `cls` is the Context passed unretained in init; it outlives the daemon.
        guard let cls, let connection, let socketContext else { return }
        let context = Unmanaged<Context>.fromOpaque(cls).takeUnretainedValue()
        if code == .CONNECTION_NOTIFY_STARTED {
            let e = ConnectionWatch.Entry(fd: mqt_mhd_connection_fd(connection))
            // The API's connections have a cap of their own (MHD's limit has room for leases
            // too): past it, the one whose request has been arriving the longest makes room.
            context.watch.add(e, cap: context.limits.connections)
            // SAFETY: retained here, released once below at CLOSED, which MHD calls for
            // every connection it told STARTED of.
            socketContext.pointee = Unmanaged.passRetained(e).toOpaque()
        } else if let p = socketContext.pointee {
            // SAFETY: balances the passRetained of STARTED.
            let e = Unmanaged<ConnectionWatch.Entry>.fromOpaque(p).takeRetainedValue()
            context.watch.remove(e)
            socketContext.pointee = nil
        }
    }

    private static let completed: MHD_RequestCompletedCallback = { cls, connection, conCls, _ in
        // The answer is sent (or the request ended): the next request may begin.
        if let connection { entry(of: connection)?.waiting() }
        guard let conCls, let state = conCls.pointee else { return }
        // SAFETY: `state` is the Upload retained in the access handler, not yet released.
        let upload = Unmanaged<Upload>.fromOpaque(state).takeUnretainedValue()
        if upload.answering, let cls {
            // SAFETY: `cls` is the Context passed unretained in init; it outlives the daemon.
            Unmanaged<Context>.fromOpaque(cls).takeUnretainedValue().answering.end()
        }
        // A 101 queued but never sent (the client went first): undo what it was for.
        if let upgrade = upload.upgrade {
            upload.upgrade = nil
            if let context = upload.context { aside(context) { upgrade.abandon() } } else { upgrade.abandon() }
        }
        // SAFETY: balances the passRetained of the access handler's first call.
        Unmanaged<Upload>.fromOpaque(state).release()
        conCls.pointee = nil
    }

    /// The response with `Connection: close`: after it, MHD closes the connection.
    private static func closing(_ r: HTTPResponse) -> HTTPResponse {
        var r = r
        r.headers.append(("Connection", "close"))
        return r
    }

    private static func header(_ connection: OpaquePointer, _ name: String) -> String? {
        MHD_lookup_connection_value(connection, .HEADER_KIND, name).map { String(cString: $0) }
    }

    private static func queue(_ connection: OpaquePointer, _ response: HTTPResponse) -> MHD_Result {
        let r = response.body.withUnsafeBytes { raw in
            // SAFETY: MUST_COPY: MHD copies the bytes before returning, so the buffer may go.
            mqt_mhd_response_copy(raw.count, raw.baseAddress)
        }
        guard let r else { return .NO }
        defer { MHD_destroy_response(r) }
        for (name, value) in response.headers { MHD_add_response_header(r, name, value) }
        return MHD_queue_response(connection, UInt32(response.status), r)
    }
}

/// A connection after a 101: its raw socket, borrowed (MHD owns it), until `close()` asks
/// MHD to close it. Closing twice does nothing; hooks run before the socket goes, so whoever
/// watches it lets go first.
public final class UpgradedConnection: Sendable {
    /// Valid until `close()`.
    public let fd: Int32
    // SAFETY: the handle is MHD's; it is used once, for the close, under the mutex, and never
    // after MHD_stop_daemon (the server closes every open connection before it stops).
    private struct State: @unchecked Sendable {
        // SAFETY (@unchecked): MHD's handle is only touched under the mutex, once.
        var handle: OpaquePointer?
        var hooks: [@Sendable () -> Void] = []
    }

    private let state: Mutex<State>

    fileprivate init(fd: Int32, handle: OpaquePointer) {
        self.fd = fd
        state = Mutex(State(handle: handle))
    }

    /// Runs `hook` just before the connection closes; false (and not registered) if it is
    /// closed already.
    @discardableResult
    public func onClose(_ hook: @escaping @Sendable () -> Void) -> Bool {
        state.withLock { s in
            guard s.handle != nil else { return false }
            s.hooks.append(hook)
            return true
        }
    }

    public var isClosed: Bool { state.withLock { $0.handle == nil } }

    /// Shuts the socket down (the peer reads end of file at once) and hands it back to MHD to
    /// close. Idempotent.
    public func close() {
        let (h, hooks) = state.withLock { s in
            defer { s = State(handle: nil) }
            return (s.handle, s.hooks)
        }
        guard let h else { return }
        for hook in hooks { hook() }
        UnixSocket.shutdownBoth(fd)
        _ = mqt_mhd_upgrade_close(h)
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
