import Dispatch
import Synchronization
import TunKit

/// The single owner of every device, queue fd and limit.
///
/// Every change is serialised by one lock (`control`) and decided before the kernel is
/// touched where it can be; a change that fails half-way is rolled back fully (every fd it
/// opened is closed, no device it made remains). Reads never take that lock: they copy the
/// state last published (`published`) and read counters lock-free, so a long change (a
/// 256-queue create) never stalls a stats request.
public final class DeviceManager: Sendable {
    struct QueueEntry: Sendable {
        let id: Int
        let key: UInt64
        let fd: Int32
        let worker: Int
        var enabled: Bool
        let counters: CounterBlock
    }

    struct DeviceEntry: Sendable {
        let key: UInt64
        let name: String
        let kind: DeviceKind
        var maxQueues: Int
        let persist: Bool
        let vnetHdr: Bool
        var mtu: Int
        let mac: MACAddress?
        var up: Bool
        var mode: DeviceMode
        let ifindex: Int
        var queues: [Int: QueueEntry]

        /// Any queue's fd: all are bound to the same device.
        var anyFD: Int32? { queues.values.first?.fd }
    }

    struct State: Sendable {
        var devices: [String: DeviceEntry] = [:]
        var maxQueues: Int
        var nextKey: UInt64 = 1

        mutating func takeKey() -> UInt64 {
            defer { nextKey += 1 }
            return nextKey
        }
    }

    private let driver: any TunDriver
    private let pool: WorkerPool
    private let control: Mutex<State>
    private let published: Mutex<State>
    private let log: @Sendable (String) -> Void
    private let reaper = DispatchQueue(label: "mqtapd.reaper")

    /// Starts `workers` worker threads (default: one per online CPU) with a global queue
    /// limit of `maxQueues` (default: the kernel's 256).
    public init(driver: any TunDriver = LinuxTunDriver(),
                workers: Int = ProcessResources.onlineCPUs(),
                maxQueues: Int = Tun.kernelMaxQueues,
                log: @escaping @Sendable (String) -> Void = { _ in }) throws {
        try Validate.maxQueues(maxQueues)
        guard workers >= 1 else { throw ManagerError.invalidField(field: "workers", reason: "must be at least 1") }
        self.driver = driver
        self.log = log
        // The pool reports vanished devices before `self` exists; the relay is pointed at
        // the manager once it does.
        let relay = GoneRelay()
        pool = try WorkerPool(count: workers) { key in relay.forward(key) }
        let state = State(maxQueues: maxQueues)
        control = Mutex(state)
        published = Mutex(state)
        relay.set(self)
    }

    /// A manager dropped without `shutdown()` still closes its fds and joins its workers.
    deinit { shutdown() }

    public var workerCount: Int { pool.count }

    // MARK: - Reads (never wait for a change in progress, except to drop a vanished device)

    public func devices() -> [DeviceInfo] {
        let snapshot = reapVanished(published.withLock { $0 })
        return snapshot.devices.values.sorted { $0.name < $1.name }.map(Self.info)
    }

    public func device(_ name: String) throws(ManagerError) -> DeviceInfo {
        Self.info(try liveSnapshot(name))
    }

    public func queues(_ name: String) throws(ManagerError) -> [QueueInfo] {
        try device(name).queues
    }

    public func queue(_ name: String, id: Int) throws(ManagerError) -> QueueInfo {
        let entry = try liveSnapshot(name)
        guard let q = entry.queues[id] else { throw .queueNotFound(device: name, id: id) }
        return Self.info(q)
    }

    public func stats(_ name: String) throws(ManagerError) -> DeviceStats {
        let entry = try liveSnapshot(name)
        let queues = entry.queues.values.sorted { $0.id < $1.id }.map { QueueStats(id: $0.id, counters: $0.counters.read()) }
        let total = queues.reduce(CounterValues()) { $0 + $1.counters }
        return DeviceStats(queues: queues, total: total, kernel: driver.statistics(name) ?? [:])
    }

    public func limits() -> LimitsInfo {
        let s = published.withLock { $0 }
        return LimitsInfo(
            maxQueues: s.maxQueues, kernelMaxQueues: Tun.kernelMaxQueues, devices: s.devices.count,
            queuesInUse: s.devices.values.reduce(0) { $0 + $1.queues.count },
            openFiles: ProcessResources.openFileCount(), openFilesLimit: ProcessResources.fileLimit().soft)
    }

    // MARK: - Changes

    public func create(_ spec: DeviceSpec) throws(ManagerError) -> DeviceInfo {
        try Validate.name(spec.name)
        guard spec.queues >= 1 else { throw .invalidField(field: "queues", reason: "must be at least 1") }
        if let m = spec.maxQueues { try Validate.maxQueues(m) }
        if let mtu = spec.mtu { try Validate.mtu(mtu) }
        if let mac = spec.mac {
            guard spec.kind == .tap else { throw .invalidField(field: "mac", reason: "only TAP devices have a MAC address") }
            guard !mac.isMulticast, !mac.isZero else {
                throw .invalidField(field: "mac", reason: "must be a unicast, non-zero address")
            }
        }
        return try change { (state) throws(ManagerError) in
            let limit = spec.maxQueues ?? state.maxQueues
            guard limit <= state.maxQueues else {
                throw .aboveGlobalLimit(field: "max_queues", value: limit, limit: state.maxQueues)
            }
            guard spec.queues <= limit else {
                throw .queueLimitExceeded(device: spec.name, limit: limit, requested: spec.queues, errno: nil)
            }
            if let existing = state.devices[spec.name] {
                guard vanished(existing) else { throw .nameConflict(name: spec.name, errno: nil) }
                drop(existing, from: &state, reason: "deleted outside mqtapd")
            }
            let entry = try build(spec, limit: limit, key: state.takeKey(), state: &state)
            state.devices[spec.name] = entry
            log("device created name=\(spec.name) queues=\(spec.queues) ifindex=\(entry.ifindex)")
            return Self.info(entry)
        }
    }

    public func delete(_ name: String) throws(ManagerError) {
        try change { (state) throws(ManagerError) in
            let entry = try live(name, in: &state)
            if entry.persist, let fd = entry.anyFD {
                // Cleared first: if the kernel refuses, nothing has changed yet.
                try step(name, .setPersist) { () throws(SyscallError) in try driver.setPersist(fd, false) }
            }
            release(entry)
            state.devices[name] = nil
            log("device deleted name=\(name)")
        }
    }

    public func update(_ name: String, _ patch: DevicePatch) throws(ManagerError) -> DeviceInfo {
        if let m = patch.maxQueues { try Validate.maxQueues(m) }
        if let mtu = patch.mtu { try Validate.mtu(mtu) }
        return try change { (state) throws(ManagerError) in
            var entry = try live(name, in: &state)
            if let m = patch.maxQueues {
                guard m <= state.maxQueues else {
                    throw .aboveGlobalLimit(field: "max_queues", value: m, limit: state.maxQueues)
                }
                guard m >= entry.queues.count else {
                    throw .limitBelowUsage(field: "max_queues", limit: m, device: name, inUse: entry.queues.count)
                }
            }
            var undo: [() -> Void] = []
            if let up = patch.up, up != entry.up {
                try step(name, .setLinkUp) { () throws(SyscallError) in try driver.setUp(name, up) }
                undo.append { [driver] in try? driver.setUp(name, !up) }
                entry.up = up
            }
            if let mtu = patch.mtu, mtu != entry.mtu {
                let old = entry.mtu
                do throws(ManagerError) {
                    try step(name, .setMTU) { () throws(SyscallError) in try driver.setMTU(name, mtu) }
                } catch {
                    undo.reversed().forEach { $0() }
                    throw error
                }
                undo.append { [driver] in try? driver.setMTU(name, old) }
                entry.mtu = mtu
            }
            if let mode = patch.mode, mode != entry.mode {
                for q in entry.queues.values where q.enabled { pool.setMode(key: q.key, mode, on: q.worker) }
                entry.mode = mode
            }
            if let m = patch.maxQueues { entry.maxQueues = m }
            state.devices[name] = entry
            return Self.info(entry)
        }
    }

    /// Adds `count` queues with the smallest free ids.
    public func addQueues(_ name: String, count: Int = 1) throws(ManagerError) -> [QueueInfo] {
        guard count >= 1 else { throw .invalidField(field: "count", reason: "must be at least 1") }
        return try change { (state) throws(ManagerError) in
            var entry = try live(name, in: &state)
            let limit = min(entry.maxQueues, state.maxQueues)
            guard entry.queues.count + count <= limit else {
                throw .queueLimitExceeded(device: name, limit: limit, requested: entry.queues.count + count, errno: nil)
            }
            let ids = Self.freeIDs(count, taken: entry.queues)
            let added = try openQueues(ids: ids, for: entry, exclusiveFirst: false, state: &state)
            for q in added { entry.queues[q.id] = q }
            state.devices[name] = entry
            log("queues added device=\(name) ids=\(ids) count=\(entry.queues.count)")
            return added.map(Self.info)
        }
    }

    /// Removes a queue; returns it as it was last, its final counters included.
    @discardableResult
    public func removeQueue(_ name: String, id: Int) throws(ManagerError) -> QueueInfo {
        try change { (state) throws(ManagerError) in
            var entry = try live(name, in: &state)
            guard let q = entry.queues[id] else { throw .queueNotFound(device: name, id: id) }
            guard entry.queues.count > 1 else { throw .lastQueue(device: name, id: id) }
            close(q)
            entry.queues[id] = nil
            state.devices[name] = entry
            log("queue removed device=\(name) id=\(id) count=\(entry.queues.count)")
            // Read after the worker let go of it: these are the final counts.
            return Self.info(q)
        }
    }

    /// Detaches (`false`) or re-attaches (`true`) a queue; its fd, id, worker and counters stay.
    public func setQueueEnabled(_ name: String, id: Int, _ enabled: Bool) throws(ManagerError) -> QueueInfo {
        try change { (state) throws(ManagerError) in
            var entry = try live(name, in: &state)
            guard var q = entry.queues[id] else { throw .queueNotFound(device: name, id: id) }
            guard q.enabled != enabled else { return Self.info(q) }
            if enabled {
                try step(name, .attachQueue) { () throws(SyscallError) in try driver.setQueue(q.fd, enabled: true) }
                do throws(SyscallError) {
                    try pool.startPolling(polled(q, of: entry), on: q.worker)
                } catch {
                    try? driver.setQueue(q.fd, enabled: false)
                    throw ManagerError.from(error, device: name, step: .pollQueue)
                }
            } else {
                // Out of the epoll set before the kernel detaches it: a detached queue is
                // not the worker's to read any more.
                pool.stopPolling(key: q.key, on: q.worker)
                do throws(SyscallError) {
                    try driver.setQueue(q.fd, enabled: false)
                } catch {
                    try? pool.startPolling(polled(q, of: entry), on: q.worker)
                    throw ManagerError.from(error, device: name, step: .detachQueue)
                }
            }
            q.enabled = enabled
            entry.queues[id] = q
            state.devices[name] = entry
            log("queue \(enabled ? "enabled" : "disabled") device=\(name) id=\(id)")
            return Self.info(q)
        }
    }

    /// Sets the global per-device queue limit; every device's `max_queues` is capped to it.
    public func setLimit(maxQueues: Int) throws(ManagerError) -> LimitsInfo {
        try Validate.maxQueues(maxQueues)
        try change { (state) throws(ManagerError) in
            for entry in state.devices.values.sorted(by: { $0.name < $1.name }) where entry.queues.count > maxQueues {
                throw .limitBelowUsage(field: "max_queues", limit: maxQueues, device: entry.name, inUse: entry.queues.count)
            }
            state.maxQueues = maxQueues
            for name in state.devices.keys { state.devices[name]!.maxQueues = min(state.devices[name]!.maxQueues, maxQueues) }
            log("limit set max_queues=\(maxQueues)")
        }
        return limits()
    }

    /// Stops the workers and closes every fd: non-persistent devices disappear with their
    /// last fd; persistent ones stay for the next start. Idempotent.
    public func shutdown() {
        change { state in
            for entry in state.devices.values.sorted(by: { $0.name < $1.name }) {
                release(entry)
                log("device released name=\(entry.name) persist=\(entry.persist)")
            }
            state.devices = [:]
        }
        pool.shutdown()
    }

    // MARK: - Vanished devices

    /// Called (on the reaper queue) when a worker saw one of the device's queues fail as if
    /// the device were gone.
    fileprivate func deviceLost(key: UInt64) {
        change { state in
            guard let entry = state.devices.values.first(where: { $0.key == key }), vanished(entry) else { return }
            drop(entry, from: &state, reason: "deleted outside mqtapd")
        }
    }

    fileprivate func scheduleLost(key: UInt64) {
        reaper.async { [weak self] in self?.deviceLost(key: key) }
    }

    private func vanished(_ entry: DeviceEntry) -> Bool {
        guard let fd = entry.anyFD else { return true }
        return !driver.isBound(fd)
    }

    private func drop(_ entry: DeviceEntry, from state: inout State, reason: String) {
        release(entry)
        state.devices[entry.name] = nil
        log("device gone name=\(entry.name) reason=\"\(reason)\"")
    }

    /// Drops every device of `snapshot` that vanished; returns the state as it is after.
    private func reapVanished(_ snapshot: State) -> State {
        guard snapshot.devices.values.contains(where: vanished) else { return snapshot }
        return change { state in
            for entry in state.devices.values where vanished(entry) {
                drop(entry, from: &state, reason: "deleted outside mqtapd")
            }
            return state
        }
    }

    private func liveSnapshot(_ name: String) throws(ManagerError) -> DeviceEntry {
        guard let entry = published.withLock({ $0.devices[name] }) else { throw .deviceNotFound(name: name) }
        guard vanished(entry) else { return entry }
        deviceLost(key: entry.key)
        throw .deviceNotFound(name: name)
    }

    // MARK: - Building blocks (all called with `control` held)

    /// Runs a change under the control lock and publishes the state it leaves, whether it
    /// succeeded or not (a failed change leaves the state as it was, or with a vanished
    /// device dropped).
    private func change<T>(_ body: (inout State) throws(ManagerError) -> T) throws(ManagerError) -> T {
        try control.withLock { (state) throws(ManagerError) -> T in
            defer {
                let copy = state
                published.withLock { $0 = copy }
            }
            return try body(&state)
        }
    }

    private func change<T>(_ body: (inout State) -> T) -> T {
        control.withLock { state in
            defer {
                let copy = state
                published.withLock { $0 = copy }
            }
            return body(&state)
        }
    }

    /// The device called `name`, dropping it first if it vanished behind our back.
    private func live(_ name: String, in state: inout State) throws(ManagerError) -> DeviceEntry {
        guard let entry = state.devices[name] else { throw .deviceNotFound(name: name) }
        guard vanished(entry) else { return entry }
        drop(entry, from: &state, reason: "deleted outside mqtapd")
        throw .deviceNotFound(name: name)
    }

    private func step<T>(_ device: String, _ step: DeviceStep, queues: Int = 0,
                         _ body: () throws(SyscallError) -> T) throws(ManagerError) -> T {
        do {
            return try body()
        } catch {
            throw ManagerError.from(error, device: device, step: step, queuesRequested: queues)
        }
    }

    /// Creates the kernel device with all its queues and settings, or nothing.
    private func build(_ spec: DeviceSpec, limit: Int, key: UInt64, state: inout State) throws(ManagerError) -> DeviceEntry {
        let name = spec.name
        let flags = TunFlags.multiqueue(spec.kind, vnetHdr: spec.vnetHdr)
        // The first queue creates the device; IFF_TUN_EXCL makes the kernel refuse (EBUSY)
        // a name that exists, instead of silently joining that interface.
        let first: Int32
        do {
            first = try driver.openQueue(name: name, flags: flags.union(.exclusive))
        } catch where error.errno == .busy {
            throw .nameConflict(name: name, errno: error.errno)
        } catch {
            throw ManagerError.from(error, device: name, step: .openQueue, queuesRequested: spec.queues)
        }
        var persistSet = false
        // Undoes the device: persistence cleared, then the one fd we hold closed, which
        // makes the kernel destroy the device.
        func discard() {
            if persistSet { try? driver.setPersist(first, false) }
            driver.close(first)
        }
        var mtu = 0
        var mac: MACAddress?
        var ifindex = 0
        do {
            if let m = spec.mac {
                try step(name, .setMAC) { () throws(SyscallError) in try driver.setMAC(name, m.bytes) }
            }
            if let m = spec.mtu {
                try step(name, .setMTU) { () throws(SyscallError) in try driver.setMTU(name, m) }
            }
            if spec.persist {
                try step(name, .setPersist) { () throws(SyscallError) in try driver.setPersist(first, true) }
                persistSet = true
            }
            mtu = try step(name, .setMTU) { () throws(SyscallError) in try driver.mtu(name) }
            if spec.kind == .tap {
                mac = try step(name, .setMAC) { () throws(SyscallError) in MACAddress(bytes: try driver.mac(name)) }
            }
            ifindex = try step(name, .readIfindex) { () throws(SyscallError) in try driver.ifindex(name) }
        } catch {
            discard()
            throw error
        }
        var entry = DeviceEntry(key: key, name: name, kind: spec.kind, maxQueues: limit, persist: spec.persist,
                                vnetHdr: spec.vnetHdr, mtu: mtu, mac: mac, up: false, mode: spec.mode,
                                ifindex: ifindex, queues: [:])
        // Queue 0 is the fd that created the device; the others join it.
        let counters = CounterBlock()
        let q0 = QueueEntry(id: 0, key: state.takeKey(), fd: first, worker: pool.reserve(), enabled: true,
                            counters: counters)
        do {
            try pool.startPolling(polled(q0, of: entry), on: q0.worker)
        } catch {
            pool.release(q0.worker)
            discard()
            throw ManagerError.from(error, device: name, step: .pollQueue)
        }
        entry.queues[0] = q0
        do {
            let more = try openQueues(ids: Array(1..<spec.queues), for: entry, exclusiveFirst: false, state: &state)
            for q in more { entry.queues[q.id] = q }
            if spec.up {
                try step(name, .setLinkUp) { () throws(SyscallError) in try driver.setUp(name, true) }
                entry.up = true
            }
        } catch {
            if persistSet { try? driver.setPersist(first, false) }
            release(entry)
            throw error
        }
        return entry
    }

    /// Opens one queue per id on the existing device and starts polling them, or opens none.
    private func openQueues(ids: [Int], for entry: DeviceEntry, exclusiveFirst: Bool,
                            state: inout State) throws(ManagerError) -> [QueueEntry] {
        let flags = TunFlags.multiqueue(entry.kind, vnetHdr: entry.vnetHdr)
        var added: [QueueEntry] = []
        for id in ids {
            do {
                let fd = try driver.openQueue(name: entry.name, flags: flags)
                let q = QueueEntry(id: id, key: state.takeKey(), fd: fd, worker: pool.reserve(), enabled: true,
                                   counters: CounterBlock())
                do {
                    try pool.startPolling(polled(q, of: entry), on: q.worker)
                } catch {
                    pool.release(q.worker)
                    driver.close(fd)
                    throw ManagerError.from(error, device: entry.name, step: .pollQueue)
                }
                added.append(q)
            } catch let error as SyscallError {
                added.reversed().forEach(close)
                throw ManagerError.from(error, device: entry.name, step: .openQueue,
                                        queuesRequested: entry.queues.count + ids.count)
            } catch {
                added.reversed().forEach(close)
                throw error as! ManagerError
            }
        }
        return added
    }

    private func polled(_ q: QueueEntry, of entry: DeviceEntry) -> PolledQueue {
        PolledQueue(key: q.key, device: entry.key, fd: q.fd, counters: q.counters, mode: entry.mode,
                    macOffset: entry.kind == .tap ? (entry.vnetHdr ? Self.vnetHeaderSize : 0) : nil)
    }

    /// `sizeof(struct virtio_net_hdr)`, the kernel's default vnet header size.
    static let vnetHeaderSize = 10

    /// Stops polling a queue, then closes it: never an fd a worker may still poll.
    private func close(_ q: QueueEntry) {
        if q.enabled { pool.stopPolling(key: q.key, on: q.worker) }
        driver.close(q.fd)
        pool.release(q.worker)
    }

    /// Closes every queue of a device (a non-persistent device goes with its last fd).
    private func release(_ entry: DeviceEntry) {
        for q in entry.queues.values.sorted(by: { $0.id > $1.id }) { close(q) }
    }

    /// The `count` smallest ids not in `taken`.
    static func freeIDs(_ count: Int, taken: [Int: QueueEntry]) -> [Int] {
        var ids: [Int] = []
        var candidate = 0
        while ids.count < count {
            if taken[candidate] == nil { ids.append(candidate) }
            candidate += 1
        }
        return ids
    }

    // MARK: - Views

    static func info(_ q: QueueEntry) -> QueueInfo {
        QueueInfo(id: q.id, enabled: q.enabled, worker: q.worker, counters: q.counters.read())
    }

    static func info(_ e: DeviceEntry) -> DeviceInfo {
        DeviceInfo(name: e.name, kind: e.kind, maxQueues: e.maxQueues, persist: e.persist, vnetHdr: e.vnetHdr,
                   mtu: e.mtu, mac: e.mac, up: e.up, mode: e.mode, ifindex: e.ifindex,
                   queues: e.queues.values.sorted { $0.id < $1.id }.map(info))
    }
}

/// Forwards a worker's "device vanished" report to the manager without blocking the worker.
private final class GoneRelay: Sendable {
    private let target = Mutex<(@Sendable (UInt64) -> Void)?>(nil)

    func set(_ manager: DeviceManager) {
        target.withLock { $0 = { [weak manager] key in manager?.scheduleLost(key: key) } }
    }

    func forward(_ key: UInt64) {
        let t = target.withLock { $0 }
        t?(key)
    }
}
