import Logging
import Synchronization
import TunKit

/// The connection a lease lasts for, as the manager sees it: it can only be closed (on a
/// revoke). Closing twice does nothing.
public protocol LeaseConnection: Sendable {
    func close()
}

/// One lease, from its grant to its end, as the transport holds it: what to tell the holder,
/// the fds to pass (duplicates of the daemon's own, so the same queues; closed once sent),
/// and the one way it ends. The manager's record (`LeaseEntry.State`) says where it is:
/// offered, live (with its connection) or orphaned; `end()` takes it out, once, whoever calls
/// it first (a failed hand-over, the connection's hang-up, an upgrade that never happened).
public final class Lease: Sendable {
    public struct Queue: Sendable, Hashable {
        public let id: Int
        public let enabled: Bool
    }

    public let id: String
    public let device: String
    /// In the order the fds travel.
    public let queues: [Queue]
    private let files: Mutex<[OwnedFDBox]>
    private let manager: DeviceManager
    private let ended = Atomic<Bool>(false)

    init(id: String, device: String, queues: [Queue], files: [OwnedFDBox], manager: DeviceManager) {
        self.id = id
        self.device = device
        self.queues = queues
        self.files = Mutex(files)
        self.manager = manager
    }

    /// The fds to pass, in the order of `queues`; valid until `close()`.
    public var fds: [Int32] { files.withLock { $0.map(\.fd) } }

    /// Closes the duplicates (the holder has its own once they are sent). Idempotent.
    public func close() {
        let taken = files.withLock { f in
            defer { f = [] }
            return f
        }
        for box in taken { box.close() }
    }

    /// The fds are sent and the connection is watched: the lease is live for as long as it
    /// is open. False if it ended meanwhile (revoked, its device deleted, or `end()`): the
    /// caller closes the connection.
    public func connect(_ connection: any LeaseConnection) -> Bool {
        !ended.load(ordering: .acquiring) && manager.leaseConnected(device: device, lease: id, connection)
    }

    /// Ends the lease: its duplicates are closed and its queues come back to the device
    /// (see `DeviceManager.leaseEnded`). Only the first call does anything.
    public func end() {
        close()
        guard !ended.exchange(true, ordering: .acquiringAndReleasing) else { return }
        manager.leaseEnded(device: device, lease: id)
    }

    public var isEnded: Bool { ended.load(ordering: .acquiring) }
}

/// One duplicate fd's owner, in a box so a list can hold it.
final class OwnedFDBox: Sendable {
    private let owned: Mutex<OwnedFD?>
    let fd: Int32

    init(_ file: consuming OwnedFD) {
        fd = file.fd
        owned = Mutex(file)
    }

    func close() {
        let taken = owned.withLock { $0.take() }
        _ = consume taken
    }
}

extension DeviceManager {
    /// The leases of a device, by id.
    public func leases(_ name: String) throws(ManagerError) -> [LeaseInfo] {
        guard case .active(let d)? = published.withLock({ $0.devices[name] }) else {
            if case .kept(let k)? = published.withLock({ $0.devices[name] }) {
                throw .deviceNotActive(name: name, status: k.status)
            }
            throw .deviceNotFound(name: name)
        }
        return d.leases.values.sorted { $0.id < $1.id }.map(\.info)
    }

    /// Leases queues of a device to `peer`: from now on the workers neither read nor write
    /// them. The offer carries duplicates of the queues' fds to send; the lease lasts from
    /// `leaseConnected` until `leaseEnded` (or a revoke). Refusals change nothing.
    public func grantLease(_ name: String, _ request: LeaseRequest, peer: Peer) throws(ManagerError) -> Lease {
        if let ids = request.queues {
            guard !ids.isEmpty else { throw .invalidField(field: "queues", reason: "must name at least one queue") }
            guard Set(ids).count == ids.count else { throw .invalidField(field: "queues", reason: "names a queue twice") }
            for id in ids where !(0..<Tun.kernelMaxQueues).contains(id) {
                throw .invalidField(field: "queues", reason: "\(id) is not a queue id (0 to \(Tun.kernelMaxQueues - 1))")
            }
        }
        if let h = request.holder, h.count > 128 {
            throw .invalidField(field: "holder", reason: "must be at most 128 characters")
        }
        let id = Self.newLeaseID()
        do {
            return try grant(name, request, id: id, peer: peer)
        } catch .stateNotSaved(let path, let call, let errno) {
            // Made but not recorded: a crash would forget a holder has the queues. Undone (its
            // fds never left), and refused.
            leaseEnded(device: name, lease: id)
            throw .stateNotSaved(path: path, call: call, errno: errno)
        }
    }

    private func grant(_ name: String, _ request: LeaseRequest, id: String, peer: Peer) throws(ManagerError) -> Lease {
        return try change { (model) throws(ManagerError) in
            var d = try active(name, in: &model)
            // One consumer per device: the holder's frames would also go to a forwarder, and a
            // peer's frames into the holder's queues.
            if d.mode == .forward {
                throw .deviceForwarding(device: name, reason: "forwards to \(d.peer ?? "a peer") and cannot be leased", field: nil)
            }
            if let from = forwarders(to: name, in: model).first {
                throw .deviceForwarding(device: name, reason: "is forwarded to by \(from) and cannot be leased", field: nil)
            }
            if d.mode == .external {
                throw .consumerConflict(device: name, reason: "is in mode external: its consumers attach by name")
            }
            if d.leases.isEmpty, try foreignQueues(d) > 0 {
                throw .consumerConflict(device: name, reason: "has queues attached by name by other processes")
            }
            let live = model.devices.values.reduce(0) { $0 + ($1.active?.leases.values.filter { !$0.orphaned }.count ?? 0) }
            guard live < maxLeases else { throw .leaseLimit(limit: maxLeases) }
            let ids = (request.queues ?? d.queues.keys.sorted() + d.orphans.keys.sorted()).sorted()
            for id in ids {
                if let o = d.orphans[id] { throw .queueLeased(device: name, id: id, lease: o.lease) }
                guard let q = d.queues[id] else { throw .leasedQueueNotFound(device: name, id: id) }
                if let l = q.lease { throw .queueLeased(device: name, id: id, lease: l) }
            }
            guard !ids.isEmpty else { throw .invalidField(field: "queues", reason: "the device has no queue to lease") }
            // Duplicates first: if one fails, nothing has changed yet.
            var files: [OwnedFDBox] = []
            var offered: [Lease.Queue] = []
            for qid in ids {
                let q = d.queues[qid]!
                do throws(SyscallError) {
                    files.append(OwnedFDBox(try driver.duplicate(q.fd)))
                } catch {
                    files.forEach { $0.close() }
                    throw ManagerError.from(error, device: name, step: .duplicateFD)
                }
                offered.append(.init(id: qid, enabled: (try? driver.isAttached(q.fd)) ?? q.enabled))
            }
            let before = d
            do throws(ManagerError) {
                try withRollback { (rollback) throws(ManagerError) in
                    for qid in ids {
                        var q = d.queues[qid]!
                        // Out of the worker's hands before the holder gets the fd.
                        if q.polled {
                            pool.stopPolling(key: q.key, on: q.worker)
                            let was = q
                            rollback.add { [pool] in try? pool.startPolling(self.polledQueue(was, of: before), on: was.worker) }
                        }
                        // Out of the worker's hands (no solo read switches it back to blocking):
                        // non-blocking for good, as the holder shares the open file.
                        do throws(SyscallError) {
                            try q.file.share()
                        } catch {
                            throw ManagerError.from(error, device: name, step: .duplicateFD)
                        }
                        if q.held {
                            // Held detached for the device's consumer; the holder gets it as the
                            // API set it.
                            if q.enabled {
                                try step(name, .attachQueue) { () throws(SyscallError) in try driver.setQueue(q.fd, enabled: true) }
                                let fd = q.fd
                                rollback.add { [driver] in try? driver.setQueue(fd, enabled: false) }
                            }
                            q.held = false
                        }
                        q.lease = id
                        d.queues[qid] = q
                    }
                    d.leases[id] = LeaseEntry(id: id, queues: ids, holder: request.holder, peer: peer, since: Clock.timestamp(),
                                              state: .offered)
                    // Delivered only if the change is made.
                    var what: [(String, Event.Value)] = [("queues", .string(ids.map(String.init).joined(separator: ",")))]
                    if let h = request.holder { what.append(("holder", .string(h))) }
                    journal.publish(.leaseGranted, device: name, lease: id, changes: what)
                    // The lease takes the device: the queues it does not hold are detached.
                    try applyConsumer(&d, rollback: &rollback)
                }
            } catch {
                files.forEach { $0.close() }
                throw error
            }
            offered = offered.map { o in .init(id: o.id, enabled: (try? driver.isAttached(d.queues[o.id]!.fd)) ?? o.enabled) }
            model.devices[name] = .active(d)
            logger.info("lease granted", metadata: ["device": "\(name)", "lease": "\(id)", "queue": "\(ids.map(String.init).joined(separator: ","))",
                                                    "pid": "\(peer.pid)", "uid": "\(peer.uid)"])
            return Lease(id: id, device: name, queues: offered, files: files, manager: self)
        }
    }

    /// The lease's connection is up and its fds are sent (`Lease.connect`). False if the
    /// lease is gone meanwhile (revoked, or its device deleted): the caller closes the connection.
    func leaseConnected(device name: String, lease id: String, _ connection: any LeaseConnection) -> Bool {
        changeUnrefused { model -> Bool in
            guard case .active(var d)? = model.devices[name], var l = d.leases[id] else { return false }
            guard case .offered = l.state else { return false }
            l.state = .live(connection)
            d.leases[id] = l
            model.devices[name] = .active(d)
            return true
        }
    }

    /// The lease's connection closed (the holder released it, or every process holding it
    /// exited), or the upgrade never happened: the queues come back. Each queue's attach
    /// state is put back to what the API last set (only where it differs: TUNSETQUEUE to
    /// the state a queue has is EINVAL), and the workers read the attached ones again.
    func leaseEnded(device name: String, lease id: String) {
        changeUnrefused { model in
            guard case .active(var d)? = model.devices[name], let l = d.leases.removeValue(forKey: id) else { return }
            if d.leases.isEmpty {
                // The last holder is gone: the device's settings are the daemon's again, before
                // any worker reads it (unless processes attached by name still use them).
                let foreign = foreignQueuesLogged(d)
                if foreign == 0 { restoreSettings(&d, why: "lease \(id) ended") }
                checkSettings(&d, foreign: foreign, why: "lease \(id) ended")
            }
            let hold = holdsQueues(d)
            for qid in l.queues {
                guard var q = d.queues[qid], q.lease == id else { continue }
                q.lease = nil
                q.held = hold
                do {
                    var attached = try driver.isAttached(q.fd)
                    if attached != q.knownAttached {
                        // The holder's last change, not yet seen by the observer.
                        journal.publish(attached ? .queueEnabled : .queueDisabled, device: name, queue: qid, lease: id, by: .holder)
                    }
                    if attached != q.wantsAttached {
                        do throws(SyscallError) {
                            try driver.setQueue(q.fd, enabled: q.wantsAttached)
                            attached = q.wantsAttached
                            journal.publish(attached ? .queueEnabled : .queueDisabled, device: name, queue: qid, by: .daemon)
                        } catch {
                            // The record follows the kernel: the API shows the state the queue
                            // has, and an attached queue is read, whichever it is.
                            logger.error("queue not put back as the API set it; it stays as the holder left it",
                                         metadata: ["device": "\(name)", "queue": "\(qid)", "lease": "\(id)", "error": "\(error)"])
                            if !hold { q.enabled = attached }
                        }
                    }
                    q.knownAttached = attached
                    if q.polled { try pool.startPolling(polledQueue(q, of: d), on: q.worker) }
                } catch {
                    logger.error("queue not taken back", metadata: ["device": "\(name)", "queue": "\(qid)", "lease": "\(id)",
                                                                    "error": "\(error)"])
                }
                d.queues[qid] = q
            }
            // The other queues follow: read again once the last lease is gone.
            applyConsumerLogged(&d)
            model.devices[name] = .active(d)
            journal.publish(.leaseReleased, device: name, lease: id)
            logger.info("lease released", metadata: ["device": "\(name)", "lease": "\(id)"])
        }
    }

    /// Revokes a lease: its queues are detached (the holder's fds receive nothing more) and
    /// stay detached until enabled through the API; the connection is closed; the lease is
    /// forgotten. An orphaned lease is forgotten, and its queues with it (the daemon holds
    /// no fd of them).
    public func revokeLease(device name: String, lease id: String) throws(ManagerError) {
        let connection = try change { (model) throws(ManagerError) -> (any LeaseConnection)? in
            var d = try active(name, in: &model)
            guard let l = d.leases[id] else { throw .leaseNotFound(device: name, id: id) }
            // A one-queue device's queue cannot be detached, nor a second file opened while the
            // holder's is attached: only deleting the device cuts its holder off.
            if !d.multiQueue && !l.orphaned { throw .cannotRevoke(device: name) }
            // What the API had set for each queue: its fresh file gets the same.
            let wanted = Dictionary(uniqueKeysWithValues: l.queues.compactMap { d.queues[$0].map { ($0.id, $0.enabled) } })
            let connection = revoke(id, of: &d)
            // Each revoked id gets a fresh queue (a new open): the old file is its former
            // holder's too, so the daemon never reads it again.
            let ids = l.queues.filter { !d.hasQueue($0) }
            if !l.orphaned, !ids.isEmpty, d.anyFD != nil {
                var next = d
                do throws(ManagerError) {
                    try withRollback { (rollback) throws(ManagerError) in
                        for q in try openQueues(ids: ids, for: next, model: &model, rollback: &rollback) { next.queues[q.id] = q }
                        for qid in ids where wanted[qid] == false { _ = try setEnabled(&next, id: qid, false, rollback: &rollback) }
                    }
                    d = next
                    for qid in ids { journal.publish(.queueAdded, device: name, queue: qid, lease: id, by: .daemon) }
                } catch {
                    logger.error("revoked queues not opened again; the device has fewer queues",
                                 metadata: ["device": "\(name)", "lease": "\(id)", "error": "\(error)"])
                    for qid in ids { journal.publish(.queueRemoved, device: name, queue: qid, lease: id, by: .daemon) }
                }
            }
            if d.leases.isEmpty {
                let foreign = foreignQueuesLogged(d)
                if foreign == 0 { restoreSettings(&d, why: "lease \(id) revoked") }
                checkSettings(&d, foreign: foreign, why: "lease \(id) revoked")
            }
            applyConsumerLogged(&d)
            model.devices[name] = .active(d)
            return connection
        }
        connection?.close()
    }

    /// Takes a lease away from `d` (see `revokeLease`); returns its connection to close. Each
    /// of its queues leaves the device's ids: its file is kept detached among the revoked
    /// ones (its counts stay in the device's total), and the caller gives the id a fresh queue.
    func revoke(_ id: String, of d: inout ActiveDevice) -> (any LeaseConnection)? {
        guard let l = d.leases.removeValue(forKey: id) else { return nil }
        for qid in l.queues {
            if d.orphans[qid]?.lease == id {
                d.orphans[qid] = nil
                continue
            }
            guard let q = d.queues[qid], q.lease == id else { continue }
            if (try? driver.isAttached(q.fd)) == true {
                do {
                    try driver.setQueue(q.fd, enabled: false)
                    journal.publish(.queueDisabled, device: d.name, queue: qid, lease: id, by: .daemon)
                } catch {
                    logger.error("leased queue not detached", metadata: ["device": "\(d.name)", "queue": "\(qid)", "error": "\(error)"])
                }
            }
            // Not polled (it was leased): the worker slot is free, the file stays open.
            pool.release(q.worker)
            d.retired = d.retired + q.counters.read()
            d.queues[qid] = nil
            d.revoked.append(RevokedQueue(id: qid, lease: id, file: q.file))
        }
        journal.publish(.leaseRevoked, device: d.name, lease: id)
        logger.info(l.orphaned ? "orphaned lease forgotten" : "lease revoked", metadata: ["device": "\(d.name)", "lease": "\(id)"])
        return l.connection
    }

    /// `lease-` and 16 hex digits: unique across restarts (leases outlive the process).
    static func newLeaseID() -> String {
        var g = SystemRandomNumberGenerator()
        let n = g.next()
        let hex = String(n, radix: 16)
        return "lease-" + String(repeating: "0", count: 16 - hex.count) + hex
    }
}
