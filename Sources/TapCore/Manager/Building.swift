import Logging
import TunKit

/// The kernel steps of making, joining and taking apart a device, each with its undo.
/// All run with the control lock held.
extension DeviceManager {
    /// Creates the kernel device with its queues (ids `ids`) and settings, or nothing.
    /// `netns`: the namespace it is made in; nil: the daemon's own. Every step after the first
    /// open goes by the first queue's fd, so it reaches the device in whatever namespace it is.
    func build(_ spec: DeviceSpec, ids: [Int], key: UInt64, netns: NetnsFile? = nil,
               model: inout ManagerModel) throws(ManagerError) -> ActiveDevice {
        precondition(!ids.isEmpty, "a device has at least one queue")
        return try withRollback { (rollback) throws(ManagerError) in
            let first = try openFirstQueue(spec, at: spec.kernelName, exclusive: true, netns: netns, rollback: &rollback)
            try configure(spec, fd: first.fd)
            if spec.persist {
                let driver = self.driver
                try step(spec.name, .setPersist) { () throws(SyscallError) in try driver.setPersist(first.fd, true) }
                // Cleared before the first fd closes, so the device goes with it.
                rollback.add { [driver] in try? driver.setPersist(first.fd, false) }
            }
            // A one-queue external device's queue is the consumer's to attach.
            let anchored = !spec.multiQueue && spec.mode == .external
            var d = try finish(spec, first: first, ids: anchored ? [] : ids, key: key, netns: netns,
                               model: &model, rollback: &rollback)
            if anchored {
                // The daemon lets go of the file (the device is persistent) and finds the
                // device by its index from now on.
                d.anchor = LinkAnchor(netns: netns, ifindex: d.ifindex)
                first.close()
            }
            return d
        }
    }

    /// Joins a device that exists (a persistent one, after a restart), called `at` in the
    /// kernel now (it may have been renamed behind the old process's back): the queues
    /// attach to it, and a failure leaves it as it was, persistent and queue-less.
    func join(_ spec: DeviceSpec, at: String, ids: [Int], key: UInt64, netns: NetnsFile?,
              model: inout ManagerModel) throws(ManagerError) -> ActiveDevice {
        precondition(!ids.isEmpty, "a device has at least one queue")
        return try withRollback { (rollback) throws(ManagerError) in
            let first = try openFirstQueue(spec, at: at, exclusive: false, netns: netns, rollback: &rollback)
            try configure(spec, fd: first.fd)
            let d = try finish(spec, first: first, ids: ids, key: key, netns: netns, model: &model, rollback: &rollback)
            if !spec.up {
                let driver = self.driver
                do throws(SyscallError) {
                    try onLink(first.fd) { n throws(SyscallError) in try driver.setUp(n, false) }
                } catch {
                    logger.warning("joined device not set down", metadata: ["device": "\(spec.name)", "error": "\(error)"])
                }
            }
            return d
        }
    }

    /// What making and joining share once the first queue is open: the link read back, its
    /// offloads, the queues started (`ids`, the first on `first`), and the link up if asked.
    private func finish(_ spec: DeviceSpec, first: QueueHandle, ids: [Int], key: UInt64, netns: NetnsFile?,
                        model: inout ManagerModel, rollback: inout Rollback) throws(ManagerError) -> ActiveDevice {
        var d = try readLink(spec, fd: first.fd, key: key)
        d.home = netns.map { NetnsHome(path: $0.path, inode: $0.inode) }
        if spec.offload { d.offloads = try setOffloads(spec.name, fd: first.fd) }
        if let id = ids.first {
            let q0 = try startQueue(id: id, file: first, of: d, model: &model, rollback: &rollback)
            d.queues[q0.id] = q0
            for q in try openQueues(ids: Array(ids.dropFirst()), for: d, model: &model, rollback: &rollback) {
                d.queues[q.id] = q
            }
        }
        if spec.up {
            let driver = self.driver
            try step(spec.name, .setLinkUp) { () throws(SyscallError) in
                try onLink(first.fd) { n throws(SyscallError) in try driver.setUp(n, true) }
            }
            d.up = true
        }
        return d
    }

    /// A device that exists and that the daemon must not open (a restart): a one-queue
    /// external device (its one queue may be its consumer's), or one whose every queue a lease
    /// holder has. Found by its index in its namespace from now on.
    func adopt(_ spec: DeviceSpec, at name: String, key: UInt64, netns: NetnsFile?) throws(ManagerError) -> ActiveDevice {
        let driver = self.driver
        let link = try step(spec.name, .inspect) { () throws(SyscallError) -> LinkInfo? in
            try driver.inNamespace(netns?.fd) { () throws(SyscallError) -> LinkInfo? in try driver.link(named: name) }
        }
        guard let link else { throw .deviceNotFound(name: name) }
        let anchor = LinkAnchor(netns: netns, ifindex: link.ifindex)
        var mac: MACAddress?
        if spec.kind == .tap {
            // Shown when it can be read; the device is taken on either way (its consumer may
            // be using it right now).
            let bytes = try? onAnchor(anchor) { n throws(SyscallError) in try driver.mac(n) }
            mac = bytes.flatMap { MACAddress(bytes: $0) }
        }
        var d = newDevice(spec, link: link, mac: mac, up: link.up, key: key)
        d.anchor = anchor
        d.home = netns.map { NetnsHome(path: $0.path, inode: $0.inode) }
        return d
    }

    /// Opens the queue that creates (`exclusive`) or joins the device. Undo: close it, which
    /// destroys a device it created (a joined one stays, as it was).
    private func openFirstQueue(_ spec: DeviceSpec, at name: String, exclusive: Bool, netns: NetnsFile?,
                                rollback: inout Rollback) throws(ManagerError) -> QueueHandle {
        let flags = TunFlags.multiqueue(spec.kind.tunKind, vnetHdr: spec.vnetHdr, multiQueue: spec.multiQueue)
        let fd: Int32
        do {
            // IFF_TUN_EXCL makes the kernel refuse (EBUSY) a name that exists, instead of
            // silently joining that interface. In a namespace, the open itself happens there:
            // a tun file makes its device in the namespace it was opened in.
            fd = try driver.openQueue(name: name, flags: exclusive ? flags.union(.exclusive) : flags, netns: netns?.fd)
        } catch where error.errno == .busy && exclusive {
            throw .nameConflict(name: spec.name, errno: error.errno)
        } catch {
            throw ManagerError.from(error, device: spec.name, step: .openQueue, queuesRequested: spec.queues)
        }
        let handle = QueueHandle(QueueFile(fd, driver: driver))
        rollback.add { handle.close() }
        return handle
    }

    /// MAC (where it differs), MTU, owner and group, as the spec asks: on a made device and
    /// on a joined one alike (a restart puts back what was asked). A made device takes them
    /// with it when its first fd closes; a joined one keeps them.
    private func configure(_ spec: DeviceSpec, fd: Int32) throws(ManagerError) {
        let driver = self.driver
        let name = spec.name
        if let m = spec.mac {
            // Set unless it is known to be set already (a joined device usually has it).
            let now = try? onLink(fd) { n throws(SyscallError) in try driver.mac(n) }
            if now != m.bytes {
                try step(name, .setMAC) { () throws(SyscallError) in try onLink(fd) { n throws(SyscallError) in try driver.setMAC(n, m.bytes) } }
            }
        }
        if let m = spec.mtu {
            try step(name, .setMTU) { () throws(SyscallError) in try onLink(fd) { n throws(SyscallError) in try driver.setMTU(n, m) } }
        }
        if let uid = spec.owner {
            try step(name, .setOwner) { () throws(SyscallError) in try driver.setOwner(fd, uid) }
        }
        if let gid = spec.group {
            try step(name, .setGroup) { () throws(SyscallError) in try driver.setGroup(fd, gid) }
        }
    }

    /// The device as the kernel has it now (MTU, MAC, ifindex, name), with no queues yet,
    /// read through `fd` (one of its queues) wherever it is: one link query and the MAC.
    func readLink(_ spec: DeviceSpec, fd: Int32, key: UInt64) throws(ManagerError) -> ActiveDevice {
        let driver = self.driver
        let link = try step(spec.name, .inspect) { () throws(SyscallError) in try self.link(of: fd) }
        guard let link else { throw .deviceNotFound(name: spec.name) }
        var mac: MACAddress?
        if spec.kind == .tap {
            mac = try step(spec.name, .readMAC) { () throws(SyscallError) in
                MACAddress(bytes: try onLink(fd) { n throws(SyscallError) in try driver.mac(n) })
            }
        }
        // Down until the spec's `up` is set, once its queues are in.
        return newDevice(spec, link: link, mac: mac, up: false, key: key)
    }

    /// A device of `spec` as the kernel's `link` has it, with no queues yet.
    private func newDevice(_ spec: DeviceSpec, link: LinkInfo, mac: MACAddress?, up: Bool, key: UInt64) -> ActiveDevice {
        var d = ActiveDevice(key: key, name: spec.name, kind: spec.kind, ownMaxQueues: spec.maxQueues, persist: spec.persist,
                             vnetHdr: spec.vnetHdr, mtu: link.mtu, mac: mac, up: up, mode: spec.mode, peer: spec.peer,
                             offload: spec.offload, ifindex: link.ifindex, owner: spec.owner, group: spec.group,
                             kernelName: link.name, queues: [:], since: Clock.timestamp())
        d.multiQueue = spec.multiQueue
        d.labels = spec.labels
        d.ifname = spec.ifname
        return d
    }

    /// Makes a worker read an open queue. Undo: the worker lets go of it (the fd's own undo
    /// closes it after).
    private func startQueue(id: Int, file: QueueHandle, of d: ActiveDevice, model: inout ManagerModel,
                            rollback: inout Rollback) throws(ManagerError) -> QueueEntry {
        var q = QueueEntry(id: id, key: model.takeKey(), file: file, worker: pool.reserve(), enabled: true,
                           counters: CounterBlock(), since: Clock.timestamp())
        if holdsQueues(d) {
            // Another consumer has the device: the new queue is held detached, never read.
            do throws(SyscallError) {
                try driver.setQueue(file.fd, enabled: false)
            } catch {
                pool.release(q.worker)
                throw ManagerError.from(error, device: d.name, step: .detachQueue)
            }
            q.held = true
            q.knownAttached = false
            rollback.add { [pool] in pool.release(q.worker) }
            return q
        }
        do {
            try pool.startPolling(polledQueue(q, of: d), on: q.worker)
        } catch {
            pool.release(q.worker)
            throw ManagerError.from(error, device: d.name, step: .pollQueue)
        }
        rollback.add { [pool] in
            pool.stopPolling(key: q.key, on: q.worker)
            pool.release(q.worker)
        }
        return q
    }

    /// Opens one queue per id on the existing device and starts polling them; each one's
    /// undo is registered as it succeeds.
    func openQueues(ids: [Int], for d: ActiveDevice, model: inout ManagerModel,
                    rollback: inout Rollback) throws(ManagerError) -> [QueueEntry] {
        let flags = TunFlags.multiqueue(d.kind.tunKind, vnetHdr: d.vnetHdr, multiQueue: d.multiQueue)
        var added: [QueueEntry] = []
        for id in ids {
            let fd = try step(d.name, .openQueue, queues: d.queues.count + ids.count) { () throws(SyscallError) in
                // By the name it has now, in the namespace it is in now: it may have been renamed
                // or moved, and the old name may be another interface's.
                let driver = self.driver
                return try onDevice(d) { name throws(SyscallError) in try driver.openQueue(name: name, flags: flags) }
            }
            let file = QueueHandle(QueueFile(fd, driver: driver))
            rollback.add { file.close() }
            added.append(try startQueue(id: id, file: file, of: d, model: &model, rollback: &rollback))
        }
        return added
    }

    /// Detaches or re-attaches one queue. Undo: the other way. A leased queue's attach
    /// state is set on the daemon's fd (the same queue as the holder's), as the kernel has
    /// it now; the workers keep away from it either way.
    func setEnabled(_ d: inout ActiveDevice, id: Int, _ enabled: Bool,
                    rollback: inout Rollback) throws(ManagerError) -> QueueEntry {
        let name = d.name
        guard var q = d.queues[id] else { throw .queueNotFound(device: name, id: id) }
        if q.lease != nil {
            let attached = try step(name, .readQueueState) { () throws(SyscallError) in try driver.isAttached(q.fd) }
            // Whatever happens next, the daemon has now seen this state.
            q.knownAttached = attached
            if attached != enabled {
                try step(name, enabled ? .attachQueue : .detachQueue) { () throws(SyscallError) in
                    try driver.setQueue(q.fd, enabled: enabled)
                }
                rollback.add { [driver, q] in try? driver.setQueue(q.fd, enabled: !enabled) }
            }
        } else if q.held {
            // Held for another consumer: only what the API wants once the daemon has it again.
            q.enabled = enabled
            d.queues[id] = q
            return q
        } else {
            // The kernel's state, not only the recorded one: whoever shares the queue's open
            // file (a revoked lease's holder) may have changed it.
            let attached = (try? driver.isAttached(q.fd)) ?? q.enabled
            guard q.enabled != enabled || attached != enabled else { return q }
            let entry = d
            if enabled {
                if !attached {
                    try step(name, .attachQueue) { () throws(SyscallError) in try driver.setQueue(q.fd, enabled: true) }
                    rollback.add { [driver, q] in try? driver.setQueue(q.fd, enabled: false) }
                }
                if !q.enabled {
                    do throws(SyscallError) {
                        try pool.startPolling(polledQueue(q, of: entry), on: q.worker)
                    } catch {
                        throw ManagerError.from(error, device: name, step: .pollQueue)
                    }
                    rollback.add { [pool, q] in pool.stopPolling(key: q.key, on: q.worker) }
                }
            } else {
                // Out of the epoll set before the kernel detaches it: a detached queue reports
                // POLLERR forever and is not the worker's to read any more.
                if q.enabled {
                    pool.stopPolling(key: q.key, on: q.worker)
                    rollback.add { [pool, q] in try? pool.startPolling(self.polledQueue(q, of: entry), on: q.worker) }
                }
                if attached {
                    try step(name, .detachQueue) { () throws(SyscallError) in try driver.setQueue(q.fd, enabled: false) }
                    rollback.add { [driver, q] in try? driver.setQueue(q.fd, enabled: true) }
                }
            }
        }
        q.enabled = enabled
        q.knownAttached = enabled
        d.queues[id] = q
        logger.info(enabled ? "queue enabled" : "queue disabled", metadata: ["device": "\(name)", "queue": "\(id)"])
        return q
    }

    func polledQueue(_ q: QueueEntry, of d: ActiveDevice) -> PolledQueue {
        // SAFETY: the fd is borrowed from `q.file`, which the manager closes only after the
        // worker has completed the `remove` for `q.key` (`close(_:)`).
        PolledQueue(key: q.key, device: d.key, fd: q.fd, counters: q.counters, action: action(for: d), index: q.id,
                    headerBytes: d.headerBytes, shared: q.file.isShared)
    }

    /// Removes a queue from a device: closed, and what it counted kept in the device's total.
    func remove(_ id: Int, from d: inout ActiveDevice) {
        guard let q = d.queues.removeValue(forKey: id) else { return }
        close(q)
        // Read after the worker let go of it: the final counts.
        d.retired = d.retired + q.counters.read()
    }

    /// Stops polling a queue, then closes it: never an fd a worker may still poll.
    func close(_ q: QueueEntry) {
        if q.polled { pool.stopPolling(key: q.key, on: q.worker) }
        q.file.close()
        pool.release(q.worker)
    }

    /// Closes every queue of a device (a non-persistent device goes with its last fd).
    func release(_ d: ActiveDevice) {
        for q in d.queues.values.sorted(by: { $0.id > $1.id }) { close(q) }
        for r in d.revoked { r.file.close() }
    }
}

/// A network namespace the daemon opened to make or find a device in: its fd (closed when
/// this goes), the path it was opened by and its inode.
final class NetnsFile: Sendable {
    private let file: OwnedFD
    let path: String
    let inode: UInt64

    /// Borrowed from `file`, open while this lives.
    var fd: Int32 { file.fd }

    init(_ file: consuming OwnedFD, path: String, inode: UInt64) {
        self.file = file
        self.path = path
        self.inode = inode
    }
}
