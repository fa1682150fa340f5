import CMicroHTTPD
import TunKit

// libmicrohttpd, wrapped. This file is the only importer of the C module: every MHD call the
// server makes goes through the small types below, and MHD's C callbacks land here and go on
// to `ServerCore` (HTTPServer.swift, HTTPExchange.swift, HTTPUpgrades.swift), which knows
// nothing of MHD's pointers.

/// One MHD daemon: one thread serving one copy of the listening socket.
struct MHDDaemon: @unchecked Sendable {
    // SAFETY (@unchecked): MHD's handle; `stop` is called once, by the server that started it
    // (HTTPServer takes its daemons out of a mutex before stopping them).
    private let handle: OpaquePointer

    /// Starts serving `socket`, a copy MHD owns from here (it closes it when it stops, or on
    /// some of its start failures). The errno MHD left on failure, if any, is thrown.
    static func start(socket: Int32, core: ServerCore, connections: Int, idleSeconds: Int,
                      connectionMemory: Int) throws(MHDStartError) -> MHDDaemon {
        // SAFETY: the core is passed unretained; the server owns it and stops every daemon
        // (and with them every callback) before it is released.
        let cls = Unmanaged.passUnretained(core).toOpaque()
        var err: Int32 = 0
        guard let d = mqt_mhd_start(socket, access, cls, completed, cls, notify, cls, UInt32(connections),
                                    UInt32(idleSeconds), connectionMemory, &err) else {
            throw MHDStartError(errno: err == 0 ? nil : Errno(err))
        }
        return MHDDaemon(handle: d)
    }

    /// Stops the thread and closes every connection and the socket copy. Once only.
    func stop() { MHD_stop_daemon(handle) }

    private static let access: MHD_AccessHandlerCallback = { cls, connection, url, method, version, uploadData, uploadSize, conCls in
        // SAFETY: `cls` is the ServerCore passed unretained in `start`; it outlives the daemon.
        let core = Unmanaged<ServerCore>.fromOpaque(cls!).takeUnretainedValue()
        guard let connection, let uploadSize, let conCls, let method, let url else { return .NO }
        let c = MHDConnection(connection)
        guard let stored = conCls.pointee else {
            // First call for this request: headers are in, no body yet.
            let exchange = Exchange()
            // SAFETY: retained here, released exactly once in `completed`, which MHD calls
            // for every request whose *con_cls we set.
            conCls.pointee = Unmanaged.passRetained(exchange).toOpaque()
            return result(core.headersIn(c, exchange))
        }
        // SAFETY: `stored` is the Exchange retained above; it lives until `completed`.
        let exchange = Unmanaged<Exchange>.fromOpaque(stored).takeUnretainedValue()
        if uploadSize.pointee > 0 {
            // SAFETY: MHD guarantees `uploadSize` readable bytes at uploadData for this call
            // only; `bodyIn` copies what it keeps before returning.
            core.bodyIn(exchange, UnsafeRawBufferPointer(start: uploadData, count: uploadSize.pointee))
            uploadSize.pointee = 0  // consumed (or discarded)
            return .YES
        }
        return result(core.requestIn(c, exchange, method: String(cString: method), path: String(cString: url),
                                     version: version.map { String(cString: $0) } ?? "HTTP/1.1"))
    }

    private static let completed: MHD_RequestCompletedCallback = { cls, connection, conCls, _ in
        // SAFETY: `cls` is the ServerCore passed unretained in `start`; it outlives the daemon.
        let core = Unmanaged<ServerCore>.fromOpaque(cls!).takeUnretainedValue()
        let exchange: Exchange?
        if let conCls, let stored = conCls.pointee {
            // SAFETY: balances the passRetained of the access handler's first call.
            exchange = Unmanaged<Exchange>.fromOpaque(stored).takeRetainedValue()
            conCls.pointee = nil
        } else {
            exchange = nil
        }
        core.completed(connection.map(MHDConnection.init), exchange)
    }

    private static let notify: MHD_NotifyConnectionCallback = { cls, connection, socketContext, code in
        // SAFETY: `cls` is the ServerCore passed unretained in `start`; it outlives the daemon.
        guard let cls, let connection, let socketContext else { return }
        let core = Unmanaged<ServerCore>.fromOpaque(cls).takeUnretainedValue()
        if code == .CONNECTION_NOTIFY_STARTED {
            let entry = core.connectionStarted(fd: mqt_mhd_connection_fd(connection))
            // SAFETY: retained here, released once below at CLOSED, which MHD calls for
            // every connection it told STARTED of.
            socketContext.pointee = Unmanaged.passRetained(entry).toOpaque()
        } else if let p = socketContext.pointee {
            // SAFETY: balances the passRetained of STARTED.
            core.connectionClosed(Unmanaged<ConnectionWatch.Entry>.fromOpaque(p).takeRetainedValue())
            socketContext.pointee = nil
        }
    }

    private static func result(_ ok: Bool) -> MHD_Result { ok ? .YES : .NO }
}

struct MHDStartError: Error {
    let errno: Errno?
}

/// One of MHD's connections, as the server sees it.
struct MHDConnection: @unchecked Sendable {
    // SAFETY (@unchecked): MHD's handle. It is used on the MHD thread serving the connection,
    // except `resume`, which MHD allows from any thread for a connection that is suspended
    // (and which it keeps alive until then).
    let handle: OpaquePointer

    init(_ handle: OpaquePointer) { self.handle = handle }

    /// The connection's socket, or -1.
    var fd: Int32 { mqt_mhd_connection_fd(handle) }

    /// The connection's entry in the connection watch, stored when MHD told it started.
    var watchEntry: ConnectionWatch.Entry? {
        // SAFETY: the socket context is the Entry retained in `notify` at STARTED and
        // released there at CLOSED, after the connection's last request.
        mqt_mhd_socket_context(handle).map { Unmanaged<ConnectionWatch.Entry>.fromOpaque($0).takeUnretainedValue() }
    }

    func header(_ name: String) -> String? {
        MHD_lookup_connection_value(handle, .HEADER_KIND, name).map { String(cString: $0) }
    }

    /// Every header, names lower-cased; of a header sent more than once, the first (as the
    /// admission check reads it).
    var headers: [String: String] { firsts(.HEADER_KIND, lowercased: true) }

    /// Every query parameter with a value, percent-decoded by MHD; the first of a repeated one.
    /// A bare key (`?force`) has none and is absent, so the parameter's default applies.
    var query: [String: String] { firsts(.GET_ARGUMENT_KIND, lowercased: false) }

    private func firsts(_ kind: MHD_ValueKind, lowercased: Bool) -> [String: String] {
        var all = Pairs()
        collect(kind, into: &all)
        var first: [String: String] = [:]
        for (name, value) in all.items {
            guard let value else { continue }
            let key = lowercased ? name.lowercased() : name
            if first[key] == nil { first[key] = value }
        }
        return first
    }

    /// Framing headers as they came, for the checks MHD does not make (request smuggling).
    var framing: (lengthsDiffer: Bool, contentLengths: Int, transferEncoding: Bool) {
        let f = mqt_mhd_framing(handle)
        return (f.lengths_differ != 0, Int(f.content_lengths), f.transfer_encoding != 0)
    }

    /// Stops MHD serving the connection until `resume`.
    func suspend() { MHD_suspend_connection(handle) }

    func resume() { MHD_resume_connection(handle) }

    /// Queues a response whose body MHD copies at once.
    func queue(_ response: HTTPResponse) -> Bool {
        let r = response.body.withUnsafeBytes { raw in
            // SAFETY: MUST_COPY: MHD copies the bytes before returning, so the buffer may go.
            mqt_mhd_response_copy(raw.count, raw.baseAddress)
        }
        guard let r else { return false }
        return queue(r, response.status, response.headers)
    }

    /// Queues a chunked response read from `stream` as it is produced. However it goes, the
    /// stream is `finished()` once MHD no longer needs it (or at once if MHD refuses it).
    func queue(_ response: HTTPResponse, streaming stream: Streaming) -> Bool {
        // SAFETY: retained for MHD here, released once in `streamDone`, which MHD calls when it
        // no longer needs the response; if creating the response fails, released here.
        let cls = Unmanaged.passRetained(stream).toOpaque()
        guard let r = mqt_mhd_response_stream(16 * 1024, MHDConnection.streamRead, cls, MHDConnection.streamDone) else {
            // No response, so no `streamDone`: the stream ends here.
            Unmanaged<Streaming>.fromOpaque(cls).takeRetainedValue().finished()
            return false
        }
        return queue(r, response.status, response.headers)
    }

    /// Queues a 101; once MHD has sent the head, the server's `upgraded` takes the socket.
    func queueUpgrade(_ response: HTTPResponse, core: ServerCore) -> Bool {
        // SAFETY: the core is passed unretained; it outlives the daemon (see `MHDDaemon.start`).
        let cls = Unmanaged.passUnretained(core).toOpaque()
        guard let r = MHD_create_response_for_upgrade(MHDConnection.upgraded, cls) else { return false }
        // MHD adds `Connection: Upgrade` itself; the `Upgrade` header is in the response's.
        return queue(r, 101, response.headers)
    }

    private func queue(_ r: OpaquePointer, _ status: Int, _ headers: [(String, String)]) -> Bool {
        defer { MHD_destroy_response(r) }
        for (name, value) in headers { MHD_add_response_header(r, name, value) }
        return MHD_queue_response(handle, UInt32(status), r) == .YES
    }

    /// Name and value pairs as MHD's iterator gives them.
    private struct Pairs { var items: [(String, String?)] = [] }

    private func collect(_ kind: MHD_ValueKind, into pairs: inout Pairs) {
        withUnsafeMutablePointer(to: &pairs) { p in
            // SAFETY: `p` points at `pairs` for the length of this call, and MHD calls the
            // iterator only during MHD_get_connection_values.
            _ = MHD_get_connection_values(handle, kind, { cls, _, key, value in
                guard let cls, let key else { return .YES }
                cls.assumingMemoryBound(to: Pairs.self).pointee.items.append(
                    (String(cString: key), value.map { String(cString: $0) }))
                return .YES
            }, p)
        }
    }

    private static let streamRead: MHD_ContentReaderCallback = { cls, _, buf, max in
        // SAFETY: `cls` is the Streaming retained in `queue(_:streaming:)`, alive until
        // `streamDone`; MHD gives `max` writable bytes at `buf` for this call.
        let s = Unmanaged<Streaming>.fromOpaque(cls!).takeUnretainedValue()
        switch s.read(UnsafeMutableRawBufferPointer(start: buf, count: max)) {
        case .bytes(let n): return n
        case .end: return -1  // MHD_CONTENT_READER_END_OF_STREAM (a cast macro Swift cannot import)
        case .abort: return -2  // MHD_CONTENT_READER_END_WITH_ERROR
        case .waiting: return 0  // the connection is suspended until the body wakes it
        }
    }

    private static let streamDone: MHD_ContentReaderFreeCallback = { cls in
        // SAFETY: balances the passRetained of `queue(_:streaming:)`; MHD calls this once.
        Unmanaged<Streaming>.fromOpaque(cls!).takeRetainedValue().finished()
    }

    private static let upgraded: MHD_UpgradeHandler = { cls, connection, conCls, _, _, sock, urh in
        // SAFETY: `cls` is the ServerCore (see `queueUpgrade`). `conCls` is the Exchange
        // retained in the first access-handler call; MHD keeps the request (and so the
        // Exchange, released in `completed`) alive until the upgraded connection is closed,
        // which is after this returns.
        guard let cls, let conCls, let urh else { return }
        let core = Unmanaged<ServerCore>.fromOpaque(cls).takeUnretainedValue()
        let exchange = Unmanaged<Exchange>.fromOpaque(conCls).takeUnretainedValue()
        core.upgraded(connection.map(MHDConnection.init), exchange,
                      UpgradedConnection(fd: Int32(sock), handle: MHDUpgradeHandle(urh)))
    }
}

/// MHD's handle of an upgraded connection: closing it hands the socket back to MHD.
struct MHDUpgradeHandle: @unchecked Sendable {
    // SAFETY (@unchecked): MHD's handle; `UpgradedConnection` closes it once, under its
    // mutex, and never after MHD_stop_daemon (the server closes every one before it stops).
    private let handle: OpaquePointer
    init(_ handle: OpaquePointer) { self.handle = handle }

    /// MHD closes the socket and frees the handle on its own thread afterwards.
    func close() { _ = mqt_mhd_upgrade_close(handle) }
}
