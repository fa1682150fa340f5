import Synchronization
import TunKit

/// Bounds the time a request may take to arrive and keeps room for new connections, which
/// MHD's idle timeout does not: a client that trickles one byte a second is never idle.
///
/// Each connection's current request is timed from the moment it may begin (the connection
/// opened, or the previous answer was sent) until all of it has arrived (headers and body).
/// A request still arriving after `requestSeconds` is cut (the socket is shut down and MHD
/// closes the connection); and once more than `room` connections are open, the ones whose
/// request has been arriving the longest (more than a second) are cut first, so a slow
/// client never holds the slots a quick one needs: `/v1/health` keeps answering.
final class ConnectionWatch: Sendable {
    /// One connection: its socket (borrowed from MHD) and since when its request has been
    /// arriving (0: none is, it is being handled or answered).
    final class Entry: Sendable {
        let fd: Int32
        private let since: Atomic<UInt64>

        init(fd: Int32) {
            self.fd = fd
            since = Atomic(Clock.monotonicNanoseconds())
        }

        /// The whole request is in.
        func arrived() { since.store(0, ordering: .relaxed) }
        /// The answer was sent: the next request may begin.
        func waiting() { since.store(Clock.monotonicNanoseconds(), ordering: .relaxed) }
        var arrivingSince: UInt64? {
            let s = since.load(ordering: .relaxed)
            return s == 0 ? nil : s
        }
    }

    private let entries = Mutex<[ObjectIdentifier: Entry]>([:])
    private let requestNanos: UInt64
    private let room: Int
    private let sweeper = Mutex<PeriodicThread?>(nil)

    init(requestSeconds: Double, room: Int) throws(SyscallError) {
        requestNanos = UInt64(requestSeconds * 1e9)
        self.room = room
        let thread = try PeriodicThread(name: "mqtapd-http-watch", every: 0.25) { [weak self] in self?.sweep() }
        sweeper.withLock { $0 = thread }
    }

    /// Watches a new connection. Past `cap` connections, the one whose request has been
    /// arriving the longest (an idle keep-alive one waits for its next request, so it counts)
    /// is cut, so the API's connections stay within `cap` however many leases MHD also holds;
    /// if every other one is being answered, the new one gets in all the same.
    func add(_ e: Entry, cap: Int) {
        entries.withLock { all in
            all[ObjectIdentifier(e)] = e
            guard all.count > cap else { return }
            let now = Clock.monotonicNanoseconds()
            let oldest = all.values.filter { $0 !== e }.compactMap { o in o.arrivingSince.map { (o, min($0, now)) } }
                .min { $0.1 < $1.1 }
            if let (o, _) = oldest { cut(o) }
        }
    }

    /// Called before MHD closes the socket: under the lock, so a sweep never shuts down an fd
    /// that was closed (and perhaps reused by a new connection).
    func remove(_ e: Entry) { entries.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(e)) } }

    func sweep() {
        entries.withLock { all in
            // Read under the lock, and ages never below zero: an entry added, or an answer
            // sent, a moment after `now` was read is young, not ancient.
            let now = Clock.monotonicNanoseconds()
            var arriving: [(entry: Entry, since: UInt64)] = all.values.compactMap { e in
                e.arrivingSince.map { (e, min($0, now)) }
            }
            var done = 0
            for (e, since) in arriving where now &- since > requestNanos {
                cut(e)
                done += 1
            }
            var excess = all.count - done - room
            guard excess > 0 else { return }
            arriving.sort { $0.since < $1.since }
            for (e, since) in arriving where excess > 0 && now &- since <= requestNanos && now &- since > 1_000_000_000 {
                cut(e)
                excess -= 1
            }
        }
    }

    /// The peer reads end of file; MHD sees the connection end and closes it (and tells
    /// `remove`). Marked as no longer arriving, so it is not counted twice.
    private func cut(_ e: Entry) {
        e.arrived()
        UnixSocket.shutdownBoth(e.fd)
    }

    func stop() {
        sweeper.withLock { $0.take() }?.stop()
    }
}
