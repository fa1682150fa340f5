import Synchronization
import TunKit

/// Watches the connections leases last for, on a thread of its own: MHD stops looking at a
/// connection once it is upgraded, so a holder that closes its end (or exits) is noticed
/// here, and `onHangup` runs (the manager takes the queues back).
public final class LeaseWatcher: Sendable {
    private struct Watched {
        let connection: UpgradedConnection
        let onHangup: @Sendable () -> Void
    }

    private let epoll: Epoll
    private let bell: EventFD
    // SAFETY: `thread` is set once in init and read only by `stop`, on the thread that owns
    // the watcher.
    private let thread: Mutex<NamedThread?> = Mutex(nil)
    /// Held while a connection is looked at, so a close (which unregisters first) never
    /// races a peek at its fd.
    private let watched = Mutex<[UInt64: Watched]>([:])
    private let nextToken = Atomic<UInt64>(1)
    private let stopping = Atomic<Bool>(false)

    private static let bellToken = UInt64.max

    public init() throws(SyscallError) {
        let epoll = try Epoll()
        let bell = try EventFD()
        try epoll.add(bell.fd, token: Self.bellToken)
        self.epoll = epoll
        self.bell = bell
        let t = try NamedThread(name: "mqtapd-leases") { [self] in run() }
        thread.withLock { $0 = t }
    }

    /// Watches `connection`; `onHangup` runs (on the watcher's thread) once the peer has
    /// closed it, and then the connection is closed. False if it is closed already.
    public func watch(_ connection: UpgradedConnection, onHangup: @escaping @Sendable () -> Void) -> Bool {
        let token = nextToken.add(1, ordering: .relaxed).oldValue
        let registered = watched.withLock { w -> Bool in
            // Unregistered (under this lock) before the fd goes: see `forget`.
            guard connection.onClose({ [weak self] in self?.forget(token) }) else { return false }
            do {
                try epoll.add(connection.fd, token: token, events: Epoll.readable | Epoll.peerHangup)
            } catch {
                return false
            }
            w[token] = Watched(connection: connection, onHangup: onHangup)
            return true
        }
        return registered
    }

    /// Stops watching (the connection is about to close).
    private func forget(_ token: UInt64) {
        watched.withLock { w in
            guard let x = w.removeValue(forKey: token) else { return }
            try? epoll.remove(x.connection.fd)
        }
    }

    /// Stops the thread; the connections stay (their server closes them).
    public func stop() {
        guard !stopping.exchange(true, ordering: .sequentiallyConsistent) else { return }
        bell.signal()
        let t = thread.withLock { t in
            defer { t = nil }
            return t
        }
        t?.join()
    }

    private func run() {
        let events = Epoll.Events(capacity: 16)
        while !stopping.load(ordering: .sequentiallyConsistent) {
            let n: Int
            do {
                n = try epoll.wait(into: events, timeoutMilliseconds: -1)
            } catch {
                preconditionFailure("lease watcher: \(error)")
            }
            for i in 0..<n {
                let token = events.token(i)
                if token == Self.bellToken {
                    bell.drain()
                    continue
                }
                let flags = events.flags(i)
                // Decided under the lock, acted on after it: `onHangup` takes the manager's
                // lock, and a close under that lock unregisters here.
                let hungUp = watched.withLock { w -> Watched? in
                    guard let x = w[token] else { return nil }
                    let gone = flags & (Epoll.error | Epoll.hangup) != 0 || UnixSocket.peerClosed(x.connection.fd)
                    if !gone {
                        // A holder has nothing to say; whatever it sent is dropped.
                        UnixSocket.drain(x.connection.fd)
                        return nil
                    }
                    w[token] = nil
                    try? epoll.remove(x.connection.fd)
                    return x
                }
                if let x = hungUp {
                    x.onHangup()
                    x.connection.close()
                }
            }
        }
    }
}
