import TapCore
import TunKit

/// One request and its answer, kept across MHD's calls for that request (MHD.swift retains
/// it at the first call and releases it at `completed`).
final class Exchange: @unchecked Sendable {
    // SAFETY (@unchecked): used on the MHD thread that serves the connection, except while
    // the phase is `.changing`: then the change queue alone writes `.changed(response)`, with
    // the connection suspended, and MHD's thread reads it only after MHD_resume_connection
    // (whose lock orders the two).

    /// Where the request stands. One value instead of a flag per step: each step below
    /// matches the phases it may come in.
    enum Phase {
        /// The headers are in; the body arrives here.
        case receiving([UInt8])
        /// The body went past the limit: the rest is read and dropped, and 413 answers at
        /// its end (MHD 0.9 resets a chunked upload answered half-way).
        case discarding
        /// Answered before any handler ran (a refusal): the rest of the upload is dropped.
        case refused
        /// On the change queue, the connection suspended.
        case changing
        /// The change queue's answer, for MHD's thread once the connection is resumed.
        case changed(HTTPResponse)
        /// The handler's answer is queued. `counted`: a stop waits for it to be sent (not
        /// for streams and upgrades, which the stop ends itself).
        case answered(counted: Bool)
        /// A 101 is queued: the upgrade runs once MHD has sent the head, or is abandoned in
        /// `completed` if it never was.
        case upgrading(Upgrade)
    }

    var phase = Phase.receiving([])
    var transport = HTTPRequest.Transport.tcp
}

extension ServerCore {
    /// The headers are in, no body yet: refusals that need no body are made here, so a
    /// client that may not call is never told more (a 413) than that.
    func headersIn(_ c: MHDConnection, _ x: Exchange) -> Bool {
        // Over TCP, SO_PEERCRED answers pid 0: credentials only for a Unix socket.
        let fd = c.fd
        if fd >= 0 && UnixSocket.isUnix(fd) {
            x.transport = .unix((try? UnixSocket.peerCredentials(fd)).map { Peer(pid: $0.pid, uid: $0.uid, gid: $0.gid) })
        }
        if let refusal = refusals.admit(x.transport, c.header("Authorization")) {
            return refuse(c, x, refusal)
        }
        // Framing that two parties could read two ways (request smuggling) is refused, and
        // the connection closed: where this request ends is not known.
        let framing = c.framing
        if framing.lengthsDiffer {
            return refuse(c, x, refusals.badRequest("two Content-Length headers with different values"))
        }
        if framing.contentLengths > 0 && framing.transferEncoding {
            return refuse(c, x, refusals.badRequest("Content-Length and Transfer-Encoding together"))
        }
        if let length = c.header("Content-Length").flatMap(Int.init), length > limits.bodyBytes {
            return refuse(c, x, refusals.tooLarge(limits.bodyBytes))
        }
        return true
    }

    /// A piece of the body.
    func bodyIn(_ x: Exchange, _ bytes: UnsafeRawBufferPointer) {
        guard case .receiving(var body) = x.phase else { return }  // refused or discarding
        if body.count + bytes.count > limits.bodyBytes {
            // A body of no announced length (chunked) grew past the limit.
            x.phase = .discarding
            return
        }
        x.phase = .receiving([])  // the array stays uniquely referenced while it grows
        body.append(contentsOf: bytes)
        x.phase = .receiving(body)
    }

    /// The whole request is in (or, for a change, its answer is back from the change queue).
    func requestIn(_ c: MHDConnection, _ x: Exchange, method: String, path: String, version: String) -> Bool {
        let body: [UInt8]
        switch x.phase {
        case .receiving(let b): body = b
        case .discarding: return refuse(c, x, refusals.tooLarge(limits.bodyBytes))
        case .changed(let response): return respond(c, x, response)
        case .refused, .changing, .answered, .upgrading: return true
        }
        // The whole request is in: no longer timed.
        c.watchEntry?.arrived()
        let request = HTTPRequest(method: method, path: path, headers: c.headers, body: body, query: c.query,
                                  transport: x.transport, version: version)
        // Counted before the handler runs: a stop that begins meanwhile waits for the answer.
        // Refused with the connection closed: a keep-alive client does not come back on it.
        guard answering.begin() else { return refuse(c, x, refusals.stopping) }
        switch placement(request) {
        case .inline:
            let response = handler(request)
            answering.handled()
            return respond(c, x, response)
        case .changeQueue:
            // This thread goes on serving its other connections; the connection is resumed
            // with the answer, and MHD calls `requestIn` again.
            x.phase = .changing
            c.suspend()
            changes.async { [self] in
                x.phase = .changed(handler(request))
                // Resumed before it counts as handled: a stop waits for `handled`, and MHD
                // must never stop with the connection still suspended.
                c.resume()
                answering.handled()
            }
            return true
        }
    }

    /// MHD is done with the request (its answer sent, or the client gone).
    func completed(_ c: MHDConnection?, _ x: Exchange?) {
        // The next request on the connection may begin: its time starts now.
        c?.watchEntry?.waiting()
        guard let x else { return }
        switch x.phase {
        case .changed(let response):
            answering.end()
            // The client went while its change ran: a lease handed over never reaches it.
            if let upgrade = response.upgrade { onChangeQueue { upgrade.abandon() } }
        case .changing, .answered(counted: true):
            answering.end()
        case .upgrading(let upgrade):
            // A 101 queued but never sent (the client went first): undo what it was for.
            x.phase = .answered(counted: false)
            onChangeQueue { upgrade.abandon() }
        case .receiving, .discarding, .refused, .answered(counted: false):
            break
        }
    }

    /// Queues a handler's response: plain, streamed or a 101.
    private func respond(_ c: MHDConnection, _ x: Exchange, _ response: HTTPResponse) -> Bool {
        if let upgrade = response.upgrade {
            // Upgraded connections are ended by the stop itself: not counted.
            answering.end()
            x.phase = .upgrading(upgrade)
            return c.queueUpgrade(response, core: self)
        }
        if let body = response.stream {
            // Streams, too, are ended by the stop itself.
            answering.end()
            x.phase = .answered(counted: false)
            let s = Streaming(body, c, streams)
            streams.add(s)
            body.onReady { [weak s] in s?.wake() }
            return c.queue(response, streaming: s)
        }
        x.phase = .answered(counted: true)
        return c.queue(response)
    }

    /// Answers with `response` and closes the connection after it, unhandled and uncounted.
    private func refuse(_ c: MHDConnection, _ x: Exchange, _ response: HTTPResponse) -> Bool {
        x.phase = .refused
        var r = response
        r.headers.append(("Connection", "close"))
        return c.queue(r)
    }
}
