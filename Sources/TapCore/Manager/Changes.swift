import Logging
import TunKit

/// The changes the API asks for. Each validates what it can before the lock, decides under
/// it, and touches the kernel last, with a rollback for every step.
extension DeviceManager {
    public func create(_ spec: DeviceSpec) throws(ManagerError) -> DeviceInfo {
        try Validate.name(spec.name)
        try Validate.queueCount(spec.queues, field: "queues")
        if let m = spec.maxQueues { try Validate.maxQueues(m) }
        if let mtu = spec.mtu { try Validate.mtu(mtu) }
        if let mac = spec.mac {
            guard spec.kind == .tap else { throw .invalidField(field: "mac", reason: "only TAP devices have a MAC address") }
            guard !mac.isMulticast, !mac.isZero else {
                throw .invalidField(field: "mac", reason: "must be a unicast, non-zero address")
            }
        }
        try requireFeatures(for: spec)
        if spec.offload && !spec.vnetHdr {
            throw .invalidField(field: "offload", reason: "needs vnet_hdr: true (offloaded frames carry a virtio-net header)")
        }
        if let i = spec.ifname { try Validate.name(i, field: "ifname") }
        try Validate.labels(spec.labels)
        if !spec.multiQueue {
            guard spec.queues == 1 else {
                throw .invalidField(field: "queues", reason: "a device that is not multi_queue has exactly one queue")
            }
        }
        // A one-queue device for an external consumer: the kernel lets one file attach, the
        // consumer's, so the daemon holds none and keeps the device alive by persistence.
        var spec = spec
        if !spec.multiQueue && spec.mode == .external { spec.persist = true }
        // Opened before the lock: a slow mount never holds up other changes.
        let netns = try openNetns(spec.netns)
        let home = netns.map { NetnsHome(path: $0.path, inode: $0.inode) }
        let d = try change { (model) throws(ManagerError) -> ActiveDevice in
            try checkForward(name: spec.name, kind: spec.kind, vnetHdr: spec.vnetHdr, mode: spec.mode, peer: spec.peer,
                             in: model)
            try checkForwardConsumers(device: spec.name, mode: spec.mode, peer: spec.peer, in: model)
            let limit = spec.maxQueues ?? model.maxQueues
            guard limit <= model.maxQueues else {
                throw .aboveGlobalLimit(field: "max_queues", value: limit, limit: model.maxQueues)
            }
            guard spec.queues <= limit else {
                throw .queueLimitExceeded(device: spec.name, limit: limit, requested: spec.queues, errno: nil)
            }
            if let existing = model.devices[spec.name] {
                // Gone behind our back but not reported yet: dropped now, the name is free.
                guard vanished(existing) else { throw .nameConflict(name: spec.name, errno: nil) }
                drop(existing, from: &model)
            }
            let ids = Array(0..<spec.queues)
            // A persistent device outlives a crash: it is in the state file before the kernel
            // has it, so a crash (or a state file that cannot be written) never leaves a
            // persistent link the daemon does not know. A restart makes or joins it.
            if spec.persist, let error = save(&model, adding: .init(spec: spec, queues: ids.map { .init(id: $0, enabled: true) },
                                                                  home: home)) {
                logger.error("the persistent device is not made: its state cannot be saved", metadata: ["device": "\(spec.name)"])
                throw error
            }
            let d: ActiveDevice
            do throws(ManagerError) {
                d = try build(spec, ids: ids, key: model.takeKey(), netns: netns, model: &model)
            } catch {
                // The state file goes back to what the model has (without the intent).
                if spec.persist { _ = save(&model) }
                throw error
            }
            model.devices[spec.name] = .active(d)
            journal.publish(.deviceCreated, device: spec.name)
            logger.info("device created", metadata: ["device": "\(spec.name)", "queues": "\(spec.queues)", "ifindex": "\(d.ifindex)"])
            return d.forReaders
        }
        // Read from the kernel once the lock is let go: a view never holds up other changes.
        return view(.active(d))
    }

    /// The namespace `spec` names (a path, or a bare name under /run/netns), opened; nil for
    /// the daemon's own.
    func openNetns(_ spec: String?) throws(ManagerError) -> NetnsFile? {
        guard let spec else { return nil }
        guard !spec.isEmpty, !spec.utf8.contains(0) else { throw .invalidField(field: "netns", reason: "must be a path or a name") }
        let path = Netns.path(spec)
        let fd: OwnedFD
        do throws(Netns.OpenError) {
            fd = try Netns.open(path: path)
        } catch {
            switch error {
            case .missing: throw .netnsNotFound(path: path)
            case .notNetns(let why): throw .invalidField(field: "netns", reason: "\(path) is not a network namespace: \(why)")
            case .failed(let e): throw .kernel(device: path, step: .inspect, call: e.call, errno: e.errno)
            }
        }
        let inode: UInt64
        do {
            inode = try Netns.inode(fd.fd)
        } catch {
            throw .kernel(device: path, step: .inspect, call: error.call, errno: error.errno)
        }
        return NetnsFile(fd, path: path, inode: inode)
    }

    /// A spec that needs a tun feature this kernel lacks is refused, naming the field.
    private func requireFeatures(for spec: DeviceSpec) throws(ManagerError) {
        if spec.vnetHdr && !features.contains(.vnetHdr) {
            throw .featureMissing(feature: "IFF_VNET_HDR", field: "vnet_hdr")
        }
        let kind: TunFlags = spec.kind == .tap ? .tap : .tun
        if !features.contains(kind) {
            throw .featureMissing(feature: kind.names.first ?? kind.hex, field: "type")
        }
    }

    /// Deletes a device. One with leases is refused (`deviceLeased`) unless `force`, which
    /// revokes them and deletes the link itself (RTM_DELLINK): the holders' fds would
    /// otherwise keep it alive.
    public func delete(_ name: String, force: Bool = false) throws(ManagerError) {
        let connections = try change { (model) throws(ManagerError) -> [any LeaseConnection] in
            if case .kept(let k)? = model.devices[name] {
                // Never ours in the kernel: forgetting it touches nothing there.
                model.devices[name] = nil
                journal.publish(.deviceDeleted, device: name)
                logger.info("device forgotten", metadata: ["device": "\(name)", "status": "\(k.status.name)"])
                return []
            }
            var d = try active(name, in: &model)
            var connections: [any LeaseConnection] = []
            // The kernel's view, not only the daemon's: `TUNSETPERSIST` by anyone sharing a
            // queue's open file, or queues others attached by name, keep the link after the
            // daemon's fds close. The answer is 204 only once the link is gone.
            // nil if the kernel did not answer (out of fds, say: when a DELETE is most wanted);
            // the persistence is then cleared whatever it is.
            let link = d.anyFD.flatMap { try? self.link(of: $0) }
            let persistent = link.map { $0.tun?.persist ?? d.persist } ?? true
            let foreign = link.map { foreignQueues(d, $0) } ?? 0
            if link == nil && d.anyFD != nil {
                logger.warning("device deleted without a look at the kernel's view of it: queues others hold would keep it",
                               metadata: ["device": "\(name)"])
            }
            if !d.leases.isEmpty {
                guard force else { throw .deviceLeased(device: name, leases: d.leases.keys.sorted()) }
                try deleteLink(d)
                for id in d.leases.keys.sorted() {
                    if let c = revoke(id, of: &d) { connections.append(c) }
                }
            } else if foreign > 0 {
                try deleteLink(d)
                logger.info("device deleted with queues others held", metadata: ["device": "\(name)", "foreign_queues": "\(foreign)"])
            } else if !d.revoked.isEmpty || d.queues.values.contains(where: { $0.file.isShared }) {
                // A former holder may still have a copy of a file once handed out (revoked, or
                // kept past its lease's end): closing the daemon's copies would leave the link.
                try deleteLink(d)
                logger.info("device deleted with files once handed out", metadata: ["device": "\(name)"])
            } else if persistent || d.persist {
                if let fd = d.anyFD {
                    // Cleared first: if the kernel refuses, nothing has changed yet.
                    try step(name, .setPersist) { () throws(SyscallError) in try driver.setPersist(fd, false) }
                } else {
                    // Every queue was an orphaned lease, now forgotten: no fd to clear it with.
                    try deleteLink(d)
                }
            }
            release(d)
            model.devices[name] = nil
            journal.publish(.deviceDeleted, device: name)
            logger.info("device deleted", metadata: ["device": "\(name)", "force": "\(force)"])
            return connections
        }
        for c in connections { c.close() }
    }

    /// Deletes the device's link by index; one that is gone already (its holders exited) is
    /// what was asked.
    private func deleteLink(_ d: ActiveDevice) throws(ManagerError) {
        let driver = self.driver
        do {
            // By the index the device has in the namespace it is in now.
            try onDevice(d) { name throws(SyscallError) in
                guard let link = try driver.link(named: name) else { return }
                try driver.deleteLink(ifindex: link.ifindex)
            }
        } catch where error.errno == .noDevice || error.errno == .badFileDescriptorState {
            return
        } catch {
            throw ManagerError.from(error, device: d.name, step: .deleteLink)
        }
    }

    /// Changes a device: limit, link state, MTU, mode, and the declared queue count and
    /// attached count. All or nothing: a refusal or a failed step leaves it as it was, and the
    /// state file is written once.
    public func update(_ name: String, _ patch: DevicePatch) throws(ManagerError) -> DeviceInfo {
        if let m = patch.maxQueues { try Validate.maxQueues(m) }
        if let mtu = patch.mtu { try Validate.mtu(mtu) }
        if let n = patch.queues { try Validate.queueCount(n, field: "queues") }
        if let k = patch.enabledQueues, !(0...Tun.kernelMaxQueues).contains(k) {
            throw .invalidField(field: "enabled_queues", reason: "must be between 0 and \(Tun.kernelMaxQueues)")
        }
        let d = try change { (model) throws(ManagerError) -> ActiveDevice in
            var d = try active(name, in: &model)
            let before = d
            let count = patch.queues ?? d.queueCount
            if d.externalSingle && (patch.queues != nil || patch.enabledQueues != nil) {
                throw .invalidField(field: patch.queues != nil ? "queues" : "enabled_queues",
                                    reason: "a one-queue device in mode external has no queue of the daemon's")
            }
            if !d.multiQueue {
                if count != d.queueCount { throw .notMultiQueue(device: name) }
                if patch.enabledQueues.map({ $0 != d.queueCount }) ?? false {
                    throw .invalidField(field: "enabled_queues", reason: "a one-queue device's queue cannot be detached (no TUNSETQUEUE)")
                }
            }
            // The mode and peer after the patch: a peer alone means forward to it; a mode other
            // than forward clears the peer.
            let mode = patch.mode ?? (patch.peer != nil ? .forward : d.mode)
            if patch.peer != nil && mode != .forward {
                throw .invalidField(field: "peer", reason: "a peer is only for mode forward")
            }
            let peer = mode == .forward ? (patch.peer ?? d.peer) : nil
            if !d.multiQueue && !d.externalSingle && mode == .external {
                throw .invalidField(field: "mode", reason: "a one-queue device is external from its creation (the daemon then holds "
                    + "no file of it); this one holds the daemon's")
            }
            if d.externalSingle && mode != .external {
                throw .invalidField(field: "mode", reason: "a one-queue device in mode external has no queue of the daemon's: "
                    + "its one queue is its consumer's")
            }
            if mode == .forward && (patch.mode != nil || patch.peer != nil) {
                // The same answer as a create's: the request names no peer.
                guard let peer else { throw .invalidField(field: "peer", reason: "mode forward needs a peer device") }
                try checkForward(name: name, kind: d.kind, vnetHdr: d.vnetHdr, mode: mode, peer: peer, in: model)
            }
            if mode != d.mode || peer != d.peer {
                if !d.leases.isEmpty && mode == .forward {
                    throw .deviceForwarding(device: name, reason: "is leased and cannot forward", field: "mode")
                }
                try checkForwardConsumers(device: name, mode: mode, peer: peer, in: model)
            }
            var after = d
            after.mode = mode
            after.peer = peer
            // The kernel's view, read once: its link state and MTU are what the PATCH compares
            // with (so it puts back what `ip link` changed behind the daemon's back), and its
            // count of queues others attached is what the limits count. A limit is never
            // checked on a count that was not read; a PATCH that checks none goes on with the
            // values last recorded if the kernel does not answer.
            let checksLimits = patch.maxQueues != nil || count > d.queueCount
            var now = d
            var besides = 0
            do throws(ManagerError) {
                let link = try currentLink(d)
                now.up = link.up
                now.mtu = link.mtu
                besides = queuesBesidesOwn(d, link)
            } catch {
                guard !checksLimits, case .kernel = error else { throw error }
                logger.warning("device link not read; compared with what was recorded",
                               metadata: ["device": "\(name)", "error": "\(error)"])
            }
            if let m = patch.maxQueues {
                guard m <= model.maxQueues else {
                    throw .aboveGlobalLimit(field: "max_queues", value: m, limit: model.maxQueues)
                }
                let inUse = count + besides
                guard m >= inUse else {
                    throw .limitBelowUsage(field: "max_queues", limit: m, device: name, inUse: inUse)
                }
            }
            // Queues others attached count toward the limit of a device that grows.
            let plan = try declaredQueues(d, count: count, enabled: patch.enabledQueues,
                                          limit: queueLimit(own: patch.maxQueues ?? d.ownMaxQueues, global: model.maxQueues),
                                          foreign: count > d.queueCount ? besides : 0)
            // Another consumer has the device after the change: the daemon's queues stay detached.
            if holdsQueues(after), let k = patch.enabledQueues,
               Set(d.queues.keys).union(d.orphans.keys).union(plan.add).subtracting(plan.remove).sorted().prefix(k)
                   .contains(where: { d.queues[$0]?.lease == nil && d.orphans[$0] == nil }) {
                throw .queuesHeld(device: name, consumer: after.consumer, leases: d.leases.keys.sorted())
            }
            try withRollback { (rollback) throws(ManagerError) in
                for q in try openQueues(ids: plan.add, for: d, model: &model, rollback: &rollback) { d.queues[q.id] = q }
                for (id, on) in plan.attach { _ = try setEnabled(&d, id: id, on, rollback: &rollback) }
                // By the name the device has now, in the namespace it is in now: the name it was
                // created with may belong to another interface.
                let driver = self.driver
                let device = d
                let link = { (op: @escaping @Sendable (String) throws(SyscallError) -> Void) throws(SyscallError) in
                    try self.onDevice(device, op)
                }
                if let up = patch.up {
                    if up != now.up {
                        try step(name, .setLinkUp) { () throws(SyscallError) in try link { n throws(SyscallError) in try driver.setUp(n, up) } }
                        rollback.add { try? link { n throws(SyscallError) in try driver.setUp(n, !up) } }
                    }
                    d.up = up
                }
                if let mtu = patch.mtu {
                    if mtu != now.mtu {
                        let old = now.mtu
                        try step(name, .setMTU) { () throws(SyscallError) in try link { n throws(SyscallError) in try driver.setMTU(n, mtu) } }
                        rollback.add { try? link { n throws(SyscallError) in try driver.setMTU(n, old) } }
                    }
                    d.mtu = mtu
                }
                // Last: the queues follow the device's consumer under its new mode.
                d.mode = mode
                d.peer = peer
                try applyConsumer(&d, rollback: &rollback)
            }
            // Last, as they cannot be undone (and cannot fail): closing the queues to remove.
            for id in plan.remove { remove(id, from: &d) }
            if !plan.add.isEmpty || !plan.remove.isEmpty {
                logger.info("queues declared", metadata: ["device": "\(name)", "count": "\(d.queueCount)",
                                                          "added": "\(plan.add.count)", "removed": "\(plan.remove.count)"])
            }
            if mode != before.mode || peer != before.peer {
                // A forward gets its target when the change ends (`retarget`).
                if mode != .forward {
                    for q in d.queues.values where q.polled { pool.setAction(key: q.key, action(for: d), on: q.worker) }
                }
            }
            if let m = patch.maxQueues { d.ownMaxQueues = m }
            model.devices[name] = .active(d)
            for id in plan.add { journal.publish(.queueAdded, device: name, queue: id, by: .api) }
            for id in plan.remove { journal.publish(.queueRemoved, device: name, queue: id, by: .api) }
            for (id, on) in plan.attach {
                journal.publish(on ? .queueEnabled : .queueDisabled, device: name, queue: id, by: .api)
            }
            let changes = Self.changes(from: before, to: d, patch: patch, kernel: now)
            if !changes.isEmpty { journal.publish(.deviceChanged, device: name, changes: changes) }
            return d.forReaders
        }
        // Read from the kernel once the lock is let go: a view never holds up other changes.
        return view(.active(d))
    }

    /// The fields a PATCH changed, with their new values, for `device.changed`.
    static func changes(from old: ActiveDevice, to new: ActiveDevice, patch: DevicePatch,
                        kernel: ActiveDevice) -> [(String, Event.Value)] {
        var c: [(String, Event.Value)] = []
        if new.ownMaxQueues != old.ownMaxQueues, let m = new.ownMaxQueues { c.append(("max_queues", .int(m))) }
        if patch.up != nil && new.up != kernel.up { c.append(("up", .bool(new.up))) }
        if patch.mtu != nil && new.mtu != kernel.mtu { c.append(("mtu", .int(new.mtu))) }
        if new.mode != old.mode { c.append(("mode", .string(new.mode.rawValue))) }
        if new.peer != old.peer { c.append(("peer", .string(new.peer ?? ""))) }
        if new.queueCount != old.queueCount { c.append(("queues", .int(new.queueCount))) }
        let enabled = { (d: ActiveDevice) in d.queues.values.filter(\.knownAttached).count }
        if patch.enabledQueues != nil && enabled(new) != enabled(old) { c.append(("enabled_queues", .int(enabled(new)))) }
        return c
    }

    /// What a declared count asks: queue ids to add and remove, and attach states to set.
    struct QueuePlan {
        var add: [Int] = []
        var remove: [Int] = []
        var attach: [(Int, Bool)] = []
    }
}
