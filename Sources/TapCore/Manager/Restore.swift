import Logging
import TunKit

extension DeviceManager {
    /// Brings back what the state file describes; called once at start, before serving.
    ///
    /// A persistent device that still exists gets its queues re-attached, but only if its
    /// `tun_flags` match (attaching with other flags would silently rewrite them for every
    /// queue); a device that is gone is made again. Queue ids, enabled states, limits and
    /// modes come back; counters start at zero (`since` says when). A device whose name now
    /// belongs to something else, or that cannot be brought back, is kept with its status
    /// and reason, and untouched. Returns one line per such device.
    public func restore(_ desired: DesiredState) -> [String] {
        changeUnrefused { model in
            model.maxQueues = desired.maxQueues
            model.saved = desired
            var problems: [String] = []
            for d in desired.devices {
                let entry = restoreOne(d, model: &model)
                model.devices[d.spec.name] = entry
                switch entry {
                case .active(let a):
                    logger.info("device restored", metadata: ["device": "\(a.name)", "queues": "\(a.queues.count)", "persist": "\(a.persist)"])
                case .kept(let k):
                    let reason = k.status.reason ?? ""
                    journal.publish(k.status.name == "conflict" ? .deviceConflict : .deviceFailed, device: d.spec.name,
                                    changes: [("reason", .string(reason))])
                    problems.append("\(d.spec.name): \(k.status.name): \(reason)")
                    logger.error("device not restored", metadata: ["device": "\(d.spec.name)", "status": "\(k.status.name)", "reason": "\(reason)"])
                }
            }
            return problems
        }
    }

    private func restoreOne(_ d: DesiredState.Device, model: inout ManagerModel) -> DeviceEntry {
        let spec = d.spec
        func kept(_ why: KeptDevice.Why) -> DeviceEntry {
            .kept(KeptDevice(key: model.takeKey(), desired: d, why: why, since: Clock.timestamp()))
        }
        // What the API would refuse is not made from a file either (it may have been written by
        // hand, or by an older version): set aside, with the API's reason.
        do throws(ManagerError) {
            try Self.check(d)
        } catch {
            return kept(.failed(error))
        }
        // A device of another namespace is found, or made, there: never on the host. The
        // namespace must be the same one (its inode), not merely one at the same path.
        var netns: NetnsFile?
        if let home = d.home {
            guard let found = findNetns(home) else {
                let at = home.path ?? "inode \(home.inode)"
                logger.warning("device not restored: its network namespace is gone", metadata: ["device": "\(spec.name)", "netns": "\(at)"])
                return kept(.netnsGone("netns_gone: the network namespace it lived in (\(at), inode \(home.inode)) no longer exists; "
                    + "it is not made anywhere else"))
            }
            netns = found
        }
        // Whether the device outlived the old process, to be joined (or adopted) as it is.
        let exists: Bool
        // A device renamed behind the old process's back is looked for under the name it had
        // last; if that finds nothing to join, under the name it was created with.
        var at = spec.kernelName
        if let k = d.kernelName, k != at, case .success(true) = joinable(spec, at: k, netns: netns, leased: !d.leases.isEmpty) {
            at = k
            exists = true
        } else {
            switch joinable(spec, at: at, netns: netns, leased: !d.leases.isEmpty) {
            case .success(let j): exists = j
            case .failure(let why): return kept(why)
            }
        }
        // Leases live on only in a device that outlived the old process (their holders keep
        // it); made anew, it has no holder, and every queue is the daemon's again.
        let leases = exists ? d.leases : []
        if !d.leases.isEmpty && !exists {
            logger.info("leases ended with the old process", metadata: ["device": "\(spec.name)",
                                                                        "lease": "\(d.leases.map(\.id).joined(separator: ","))"])
        }
        let leased = Set(leases.flatMap(\.queues))
        let own = d.queues.filter { !leased.contains($0.id) }
        // How the device is taken back, decided once: made anew; joined (its queues attach to
        // it); or adopted as it is, with nothing opened (every queue a holder's, or a one-queue
        // external device, whose one queue may be its consumer's).
        enum Taking { case make, join, adopt }
        let how: Taking = !exists ? .make : (own.isEmpty || (!spec.multiQueue && spec.mode == .external)) ? .adopt : .join
        do {
            let key = model.takeKey()
            return try withRollback { (rollback) throws(ManagerError) in
                var a: ActiveDevice
                switch how {
                case .adopt:
                    // Found where it is (never by name on the host for a device of another
                    // namespace).
                    a = try adopt(spec, at: at, key: key, netns: netns)
                case .make:
                    a = try build(spec, ids: own.map(\.id), key: key, netns: netns, model: &model)
                    let made = a
                    rollback.add { [self] in
                        if made.persist, let fd = made.anyFD { try? driver.setPersist(fd, false) }
                        release(made)
                    }
                    for q in own where !q.enabled { _ = try setEnabled(&a, id: q.id, false, rollback: &rollback) }
                case .join:
                    a = try self.join(spec, at: at, ids: own.map(\.id), key: key, netns: netns, model: &model)
                    let joined = a
                    rollback.add { [self] in release(joined) }
                    for q in own where !q.enabled { _ = try setEnabled(&a, id: q.id, false, rollback: &rollback) }
                    if !spec.persist && leases.isEmpty, let fd = a.anyFD {
                        try step(spec.name, .setPersist) { () throws(SyscallError) in try driver.setPersist(fd, false) }
                        logger.info("device reclaimed: it was persisted from outside; it is not persistent again",
                                    metadata: ["device": "\(spec.name)"])
                    }
                }
                for l in leases {
                    for qid in l.queues {
                        let enabled = d.queues.first { $0.id == qid }?.enabled ?? true
                        a.orphans[qid] = OrphanQueue(id: qid, enabled: enabled, lease: l.id)
                    }
                    a.leases[l.id] = LeaseEntry(id: l.id, queues: l.queues, holder: l.holder, peer: l.peer, since: l.since,
                                                state: .orphaned)
                }
                // The holders still have the device: the daemon's own queues stay detached.
                try applyConsumer(&a, rollback: &rollback)
                return .active(a)
            }
        } catch {
            return kept(.failed(error))
        }
    }

    /// The API's rules for a device, applied to a state file's entry.
    static func check(_ d: DesiredState.Device) throws(ManagerError) {
        let spec = d.spec
        try Validate.name(spec.name)
        if let k = d.kernelName { try Validate.name(k, field: "kernel_name") }
        if let i = spec.ifname { try Validate.name(i, field: "ifname") }
        try Validate.labels(spec.labels)
        if !spec.multiQueue && d.queues.count != 1 {
            throw .invalidField(field: "queues", reason: "a device that is not multi_queue has exactly one queue")
        }
        try Validate.queueCount(d.queues.count, field: "queues")
        if let m = spec.maxQueues { try Validate.maxQueues(m) }
        if let mtu = spec.mtu { try Validate.mtu(mtu) }
        if spec.mac != nil && spec.kind != .tap { throw .invalidField(field: "mac", reason: "only TAP devices have a MAC address") }
        if let mac = spec.mac, mac.isMulticast || mac.isZero {
            throw .invalidField(field: "mac", reason: "must be a unicast, non-zero address")
        }
        if spec.offload && !spec.vnetHdr { throw .invalidField(field: "offload", reason: "needs vnet_hdr: true") }
        if let peer = spec.peer { try Validate.name(peer, field: "peer") }
        switch (spec.mode, spec.peer) {
        case (.forward, nil): throw .invalidField(field: "peer", reason: "mode forward needs a peer device")
        case (.forward, let p?) where p == spec.name: throw .invalidField(field: "peer", reason: "a device cannot forward to itself")
        case (.forward, _?), (_, nil): break
        case (_, _?): throw .invalidField(field: "peer", reason: "a peer is only for mode forward")
        }
    }

    /// Whether the state file's device can be made (false) or joined (true), or why neither.
    /// A device with recorded leases may be joined though it is not persistent: the lease
    /// holders kept it alive.
    private func joinable(_ spec: DeviceSpec, at name: String, netns: NetnsFile?, leased: Bool) -> Result<Bool, KeptDevice.Why> {
        let state: InterfaceState
        do {
            state = try driver.interface(name, netns: netns?.fd)
        } catch {
            return .failure(.failed(.kernel(device: spec.name, step: .inspect, call: error.call, errno: error.errno)))
        }
        switch state {
        case .absent:
            return .success(false)
        case .other:
            return .failure(.conflict("the name belongs to an interface that is not a tun/tap device"))
        case .tun(let flags):
            // A non-persistent device of the state file that someone persisted from outside
            // (TUNSETPERSIST through a shared fd) and no one holds now is this daemon's
            // leftover: joined, and made non-persistent again as asked.
            // Only under the name it was created with: a name seen later may be anyone's now.
            let reclaimable = name == spec.kernelName && flags.contains(.persist) && netns == nil
                && (try? driver.link(named: name))?.tun?.queues == 0
            guard spec.persist || leased || reclaimable else {
                return .failure(.conflict("a tun/tap device of that name exists that is not this daemon's "
                    + "(a non-persistent device does not outlive its daemon)"))
            }
            guard flags.contains(.persist) || leased else {
                return .failure(.conflict("a tun/tap device of that name is held by another process (it is not persistent)"))
            }
            let want = TunFlags.multiqueue(spec.kind.tunKind, vnetHdr: spec.vnetHdr, multiQueue: spec.multiQueue)
            let have = flags.intersection(.deviceFeatures)
            guard have == want else {
                return .failure(.conflict("its tun_flags \(have.hex) differ from the state file's \(want.hex); "
                    + "attaching would rewrite them for every queue"))
            }
            return .success(true)
        }
    }

    /// The namespace of `home`, opened, if it still exists: by its path, or by its inode under
    /// /run/netns; nil if neither finds the same namespace (inode).
    func findNetns(_ home: NetnsHome) -> NetnsFile? {
        var candidates: [String] = []
        if let p = home.path { candidates.append(p) }
        if let name = Netns.name(ofInode: home.inode) { candidates.append("/run/netns/" + name) }
        // A namespace known only by its processes (a runtime's, with no name under /run/netns).
        if let p = Netns.processPath(ofInode: home.inode) { candidates.append(p) }
        for path in candidates {
            guard let fd = try? Netns.open(path: path) else { continue }
            guard (try? Netns.inode(fd.fd)) == home.inode else { continue }
            return NetnsFile(fd, path: path, inode: home.inode)
        }
        return nil
    }
}
