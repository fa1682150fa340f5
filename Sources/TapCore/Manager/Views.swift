import TunKit

// MARK: - Reads (never wait for a change in progress, never change anything)

extension DeviceManager {
    public func devices() -> [DeviceInfo] {
        let snapshot = published.withLock { $0.devices }
        return snapshot.values.filter { !gone($0) }.sorted { $0.name < $1.name }.map(view)
    }

    public func device(_ name: String) throws(ManagerError) -> DeviceInfo {
        view(try snapshot(name))
    }

    public func queues(_ name: String) throws(ManagerError) -> [QueueInfo] {
        try device(name).queues
    }

    public func queue(_ name: String, id: Int) throws(ManagerError) -> QueueInfo {
        let d = try activeSnapshot(name)
        if let o = d.orphans[id] { return o.info }
        guard let q = d.queues[id] else { throw .queueNotFound(device: name, id: id) }
        return q.info(attached: (try? attached(q).get()) ?? nil)
    }

    public func stats(_ name: String) throws(ManagerError) -> DeviceStats {
        let d = try activeSnapshot(name)
        let queues = d.sortedQueues.map { QueueStats(id: $0.id, counters: $0.counters.read()) }
        // What removed queues had counted stays in the total: it is the device's since it was made.
        let total = queues.reduce(d.retired) { $0 + $1.counters }
        do {
            // nil: the link went between the snapshot and the read; the workers report it.
            return DeviceStats(queues: queues, total: total, kernel: try linkStatistics(d) ?? [:])
        } catch {
            return DeviceStats(queues: queues, total: total, kernel: nil, kernelError: KernelError(error))
        }
    }

    public func limits() -> LimitsInfo {
        let s = published.withLock { $0 }
        return LimitsInfo(
            maxQueues: s.maxQueues, kernelMaxQueues: Tun.kernelMaxQueues, devices: s.devices.count,
            queuesInUse: s.devices.values.reduce(0) { $0 + ($1.active?.queueCount ?? 0) },
            openFiles: ProcessResources.openFileCount(), openFilesLimit: ProcessResources.fileLimit().soft)
    }

    /// A device as the kernel has it now: link state, MTU, settings, and each queue's attach
    /// state read from the daemon's own fd (a lease holder, or any process sharing the open
    /// file, may have changed it). Called without the control lock: it reads the kernel
    /// through the entry's files, each kept open for the length of its read. A read the
    /// kernel refuses is said in `kernelError`, beside the values last recorded.
    func view(_ entry: DeviceEntry) -> DeviceInfo {
        let (global, devices) = published.withLock { ($0.maxQueues, $0.devices) }
        var d: ActiveDevice
        switch entry {
        case .kept(let k): return k.info(global: global)
        case .active(let a): d = a
        }
        var kernelError: SyscallError?
        var statistics: [String: UInt64]?
        do throws(SyscallError) {
            if let (link, place) = try lookUp(d) {
                d.up = link.up
                d.mtu = link.mtu
                d.ifindex = link.ifindex
                d.kernelName = link.name
                d.place = place
                d.foreignQueues = foreignQueues(d, link)
                statistics = link.statistics
                if let now = try readSettings(d, link: link) { d.settings = now }
            }
        } catch {
            kernelError = error
        }
        let own = d.queues.values.map { q in
            switch attached(q) {
            case .success(let a): return q.info(attached: a)
            case .failure(let e):
                kernelError = kernelError ?? e
                return q.info(attached: nil)
            }
        }
        let qs = (own + d.orphans.values.map(\.info)).sorted { $0.id < $1.id }
        let peerState = d.mode != .forward ? nil
            : (d.peer.flatMap { p in devices[p]?.active } == nil ? PeerState.missing : .active)
        // Owner and group as the kernel has them (a holder may have changed them).
        var info = DeviceInfo(name: d.name, kind: d.kind, maxQueues: queueLimit(own: d.ownMaxQueues, global: global),
                              maxQueuesSource: d.ownMaxQueues == nil ? .global : .device, persist: d.persist, vnetHdr: d.vnetHdr,
                              mtu: d.mtu, mac: d.mac, up: d.up, mode: d.mode, peer: d.peer, peerState: peerState,
                              offload: d.offload, offloads: d.offloads.names, ifindex: d.ifindex,
                              owner: d.settings.map { $0.owner } ?? d.owner, group: d.settings.map { $0.group } ?? d.group,
                              kernel: KernelView(name: d.kernelName, netns: d.place, foreignQueues: d.foreignQueues),
                              queues: qs, status: .active, since: d.since)
        info.consumer = d.consumer
        info.vnetHdrSize = d.settings?.vnet.headerSize
        info.settingsDiffer = d.settings.map { differences(d, $0) } ?? []
        info.revokedQueues = d.revoked.count
        info.unreadable = d.unreadable
        info.home = d.home
        info.multiQueue = d.multiQueue
        info.labels = d.labels
        info.kernelError = kernelError.map(KernelError.init)
        info.kernelStatistics = statistics
        return info
    }

    /// The published entry of `name`, unless it is gone from the kernel.
    private func snapshot(_ name: String) throws(ManagerError) -> DeviceEntry {
        guard let entry = published.withLock({ $0.devices[name] }), !gone(entry) else {
            throw .deviceNotFound(name: name)
        }
        return entry
    }

    private func activeSnapshot(_ name: String) throws(ManagerError) -> ActiveDevice {
        switch try snapshot(name) {
        case .active(let d): return d
        case .kept(let k): throw .deviceNotActive(name: name, status: k.status)
        }
    }

    /// Whether an active device was deleted behind our back. A read that finds so answers
    /// as if it were gone, and hands the drop to the event path (a device whose queues are
    /// all detached has no worker to notice it). A kept device has no fds to ask.
    private func gone(_ entry: DeviceEntry) -> Bool {
        guard vanished(entry) else { return false }
        scheduleLost(key: entry.key)
        return true
    }
}
