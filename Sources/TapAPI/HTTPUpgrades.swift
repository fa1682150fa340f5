import Synchronization
import TunKit

extension ServerCore {
    /// MHD sent a 101's head: the raw connection is the upgrade's from here, run on the
    /// change queue (a lease's hand-over waits for the manager's lock).
    func upgraded(_ c: MHDConnection?, _ x: Exchange, _ connection: UpgradedConnection) {
        // A lease's connection is not the API's: it leaves the watch (its slots and the room
        // it keeps for new requests are the API's alone).
        if let e = c?.watchEntry { watch.remove(e) }
        guard case .upgrading(let upgrade) = x.phase else { return connection.close() }
        x.phase = .answered(counted: false)
        guard connections.add(connection) else {
            // The server is stopping: no lease starts now.
            connection.close()
            return onChangeQueue { upgrade.abandon() }
        }
        onChangeQueue {
            // Closed meanwhile by a stopping server: the lease never starts.
            guard !connection.isClosed else { return upgrade.abandon() }
            upgrade.run(connection)
        }
    }
}

/// The upgraded connections still open: closed before MHD stops (after MHD_stop_daemon
/// their handles are freed, so nothing may close them then).
final class UpgradedConnections: Sendable {
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

/// A connection after a 101: its raw socket, borrowed (MHD owns it), until `close()` asks
/// MHD to close it. Closing twice does nothing; hooks run before the socket goes, so whoever
/// watches it lets go first.
public final class UpgradedConnection: Sendable {
    /// Valid until `close()`.
    public let fd: Int32
    private struct State {
        /// Used once, for the close; nil once closed.
        var handle: MHDUpgradeHandle?
        var hooks: [@Sendable () -> Void] = []
    }

    private let state: Mutex<State>

    init(fd: Int32, handle: MHDUpgradeHandle) {
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
        h.close()
    }
}
