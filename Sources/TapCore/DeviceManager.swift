import Dispatch
import Logging
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
        /// When the counters started (the fd was opened): counters restart with the daemon.
        let since: String
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
        /// Active, or kept from the state file without touching the kernel (see DeviceStatus).
        var status: DeviceStatus = .active
        /// For a device that is not active: the queues the state file asks for.
        var parked: [DesiredState.Queue] = []
        let since: String

        /// Any queue's fd: all are bound to the same device.
        var anyFD: Int32? { queues.values.first?.fd }

        var isActive: Bool { status == .active }

        var desired: DesiredState.Device {
            let spec = DeviceSpec(name: name, kind: kind, queues: max(queues.count, parked.count), maxQueues: maxQueues,
                                  persist: persist, vnetHdr: vnetHdr, mtu: mtu == 0 ? nil : mtu, mac: mac, up: up,
                                  mode: mode)
            let qs = isActive ? queues.values.sorted { $0.id < $1.id }.map { DesiredState.Queue(id: $0.id, enabled: $0.enabled) }
                              : parked
            return DesiredState.Device(spec: spec, queues: qs)
        }
    }

    struct State: Sendable {
        var devices: [String: DeviceEntry] = [:]
        var maxQueues: Int
        var nextKey: UInt64 = 1
        /// What the state file holds now; a change is saved only when this differs.
        var saved: DesiredState?

        var desired: DesiredState {
            DesiredState(maxQueues: maxQueues,
                         devices: devices.values.sorted { $0.name < $1.name }.map(\.desired))
        }

        mutating func takeKey() -> UInt64 {
            defer { nextKey += 1 }
            return nextKey
        }
    }

    private let driver: any TunDriver
    private let pool: WorkerPool
    private let control: Mutex<State>
    private let published: Mutex<State>
    private let logger: Logger
    private let reaper = DispatchQueue(label: "mqtapd.reaper")
    private let stateFile: StateFile?

    /// Starts `workers` worker threads (default: one per online CPU) with a global queue
    /// limit of `maxQueues` (default: the kernel's 256). With a `stateFile`, every accepted
    /// change is saved to it before the call returns (see `restore` for the way back).
    public init(driver: any TunDriver = LinuxTunDriver(),
                workers: Int = ProcessResources.onlineCPUs(),
                maxQueues: Int = Tun.kernelMaxQueues,
                stateFile: StateFile? = nil,
                logger: Logger = Logger(label: "mqtapd", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        try Validate.maxQueues(maxQueues)
        guard workers >= 1 else { throw ManagerError.invalidField(field: "workers", reason: "must be at least 1") }
        self.driver = driver
        self.logger = logger
        self.stateFile = stateFile
        // The pool reports vanished devices before `self` exists; the relay is pointed at
        // the manager once it does.
        let relay = GoneRelay()
        pool = try WorkerPool(count: workers, onGone: { key in relay.forward(key) },
                              onErrors: { key, queue, report in relay.errors(key, queue, report) })
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
        return snapshot.devices.values.sorted { $0.name < $1.name }.map { Self.info(kernelLink($0)) }
    }

    public func device(_ name: String) throws(ManagerError) -> DeviceInfo {
        Self.info(kernelLink(try liveSnapshot(name)))
    }

    /// The entry with `up` and `mtu` as the kernel has them now: `ip link` may have changed
    /// them behind the daemon's back. What was last set through the API stays where the
    /// kernel cannot be asked (a device that is not active), and is what a restart applies.
    private func kernelLink(_ entry: DeviceEntry) -> DeviceEntry {
        guard entry.isActive else { return entry }
        var e = entry
        if let up = try? driver.isUp(e.name) { e.up = up }
        if let mtu = try? driver.mtu(e.name) { e.mtu = mtu }
        return e
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
        if let reason = entry.status.reason { throw .deviceUnavailable(name: name, reason: reason) }
        let queues = entry.queues.values.sorted { $0.id < $1.id }.map { QueueStats(id: $0.id, counters: $0.counters.read()) }
        let total = queues.reduce(CounterValues()) { $0 + $1.counters }
        return DeviceStats(queues: queues, total: total, kernel: driver.statistics(ifindex: entry.ifindex) ?? [:])
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
        try Validate.queueCount(spec.queues, field: "queues")
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
            let entry = try build(spec, ids: Array(0..<spec.queues), limit: limit, key: state.takeKey(), state: &state)
            state.devices[spec.name] = entry
            logger.info("device created", metadata: ["device": "\(spec.name)", "queues": "\(spec.queues)", "ifindex": "\(entry.ifindex)"])
            return Self.info(entry)
        }
    }

    public func delete(_ name: String) throws(ManagerError) {
        try change { (state) throws(ManagerError) in
            if let known = state.devices[name], !known.isActive {
                // Never ours in the kernel: forgetting it touches nothing there.
                state.devices[name] = nil
                logger.info("device forgotten", metadata: ["device": "\(name)", "status": "\(known.status.name)"])
                return
            }
            let entry = try live(name, in: &state)
            if entry.persist, let fd = entry.anyFD {
                // Cleared first: if the kernel refuses, nothing has changed yet.
                try step(name, .setPersist) { () throws(SyscallError) in try driver.setPersist(fd, false) }
            }
            release(entry)
            state.devices[name] = nil
            logger.info("device deleted", metadata: ["device": "\(name)"])
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
            // Compared with the kernel's values, not the recorded ones: a PATCH puts back what
            // `ip link` changed behind the daemon's back.
            let now = kernelLink(entry)
            var undo: [() -> Void] = []
            if let up = patch.up {
                if up != now.up {
                    try step(name, .setLinkUp) { () throws(SyscallError) in try driver.setUp(name, up) }
                    undo.append { [driver] in try? driver.setUp(name, !up) }
                }
                entry.up = up
            }
            if let mtu = patch.mtu {
                if mtu != now.mtu {
                    let old = now.mtu
                    do throws(ManagerError) {
                        try step(name, .setMTU) { () throws(SyscallError) in try driver.setMTU(name, mtu) }
                    } catch {
                        undo.reversed().forEach { $0() }
                        throw error
                    }
                    undo.append { [driver] in try? driver.setMTU(name, old) }
                }
                entry.mtu = mtu
            }
            if let mode = patch.mode, mode != entry.mode {
                for q in entry.queues.values where q.enabled { pool.setAction(key: q.key, QueueAction.of(mode, kind: entry.kind, vnetHdr: entry.vnetHdr), on: q.worker) }
                entry.mode = mode
            }
            if let m = patch.maxQueues { entry.maxQueues = m }
            state.devices[name] = entry
            return Self.info(kernelLink(entry))
        }
    }

    /// Adds `count` queues with the smallest free ids.
    public func addQueues(_ name: String, count: Int = 1) throws(ManagerError) -> [QueueInfo] {
        try Validate.queueCount(count, field: "count")
        return try change { (state) throws(ManagerError) in
            var entry = try live(name, in: &state)
            let limit = min(entry.maxQueues, state.maxQueues)
            guard entry.queues.count + count <= limit else {
                throw .queueLimitExceeded(device: name, limit: limit, requested: entry.queues.count + count, errno: nil)
            }
            let ids = Self.freeIDs(count, taken: entry.queues)
            let added = try openQueues(ids: ids, for: entry, state: &state)
            for q in added { entry.queues[q.id] = q }
            state.devices[name] = entry
            logger.info("queues added", metadata: ["device": "\(name)", "queue": "\(ids.map(String.init).joined(separator: ","))", "count": "\(entry.queues.count)"])
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
            logger.info("queue removed", metadata: ["device": "\(name)", "queue": "\(id)", "count": "\(entry.queues.count)"])
            // Read after the worker let go of it: these are the final counts.
            return Self.info(q)
        }
    }

    /// Detaches (`false`) or re-attaches (`true`) a queue; its fd, id, worker and counters stay.
    public func setQueueEnabled(_ name: String, id: Int, _ enabled: Bool) throws(ManagerError) -> QueueInfo {
        try change { (state) throws(ManagerError) in
            var entry = try live(name, in: &state)
            let q = try setEnabled(&entry, id: id, enabled)
            state.devices[name] = entry
            return Self.info(q)
        }
    }

    private func setEnabled(_ entry: inout DeviceEntry, id: Int, _ enabled: Bool) throws(ManagerError) -> QueueEntry {
        let name = entry.name
        guard var q = entry.queues[id] else { throw .queueNotFound(device: name, id: id) }
        guard q.enabled != enabled else { return q }
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
        logger.info(enabled ? "queue enabled" : "queue disabled", metadata: ["device": "\(name)", "queue": "\(id)"])
        return q
    }

    /// Sets the global per-device queue limit; every device's `max_queues` is capped to it.
    public func setLimit(maxQueues: Int) throws(ManagerError) -> LimitsInfo {
        try Validate.maxQueues(maxQueues)
        try change { (state) throws(ManagerError) in
            for entry in state.devices.values.sorted(by: { $0.name < $1.name }) where entry.desired.queues.count > maxQueues {
                throw .limitBelowUsage(field: "max_queues", limit: maxQueues, device: entry.name,
                                       inUse: entry.desired.queues.count)
            }
            state.maxQueues = maxQueues
            for name in state.devices.keys { state.devices[name]!.maxQueues = min(state.devices[name]!.maxQueues, maxQueues) }
            logger.info("limit set", metadata: ["max_queues": "\(maxQueues)"])
        }
        return limits()
    }

    /// Stops the workers and closes every fd: non-persistent devices disappear with their
    /// last fd; persistent ones stay. The state file keeps every device, so the next start
    /// brings them all back. Idempotent.
    public func shutdown() {
        control.withLock { state in
            for entry in state.devices.values.sorted(by: { $0.name < $1.name }) where entry.isActive {
                release(entry)
                logger.info("device released", metadata: ["device": "\(entry.name)", "persist": "\(entry.persist)"])
            }
            state.devices = [:]
            let copy = state
            published.withLock { $0 = copy }
        }
        pool.shutdown()
    }

    // MARK: - Restart

    /// Brings back what the state file describes; called once at start, before serving.
    ///
    /// A persistent device that still exists gets its queues re-attached, but only if its
    /// `tun_flags` match (attaching with other flags would silently rewrite them for every
    /// queue); a device that is gone is made again. Queue ids, enabled states, limits and
    /// modes come back; counters start at zero (`since` says when). A device whose name now
    /// belongs to something else, or that cannot be brought back, stays known with its
    /// status and reason, and untouched. Returns one line per such device.
    public func restore(_ desired: DesiredState) -> [String] {
        change { state in
            state.maxQueues = desired.maxQueues
            state.saved = desired
            var problems: [String] = []
            for d in desired.devices {
                let entry = restoreOne(d, state: &state)
                state.devices[d.spec.name] = entry
                if let reason = entry.status.reason {
                    problems.append("\(d.spec.name): \(entry.status.name): \(reason)")
                    logger.error("device not restored", metadata: ["device": "\(d.spec.name)", "status": "\(entry.status.name)", "reason": "\(reason)"])
                } else {
                    logger.info("device restored", metadata: ["device": "\(d.spec.name)", "queues": "\(entry.queues.count)", "persist": "\(entry.persist)"])
                }
            }
            return problems
        }
    }

    private func restoreOne(_ d: DesiredState.Device, state: inout State) -> DeviceEntry {
        let spec = d.spec
        let limit = min(spec.maxQueues ?? state.maxQueues, state.maxQueues)
        func parked(_ status: DeviceStatus) -> DeviceEntry {
            var e = DeviceEntry(key: state.takeKey(), name: spec.name, kind: spec.kind, maxQueues: limit,
                                persist: spec.persist, vnetHdr: spec.vnetHdr, mtu: spec.mtu ?? 0, mac: spec.mac,
                                up: spec.up, mode: spec.mode, ifindex: 0, queues: [:], since: Clock.timestamp())
            e.status = status
            e.parked = d.queues
            return e
        }
        let join: Bool
        switch driver.interface(spec.name) {
        case .absent:
            join = false
        case .other:
            return parked(.conflict("the name belongs to an interface that is not a tun/tap device"))
        case .tun(let flags):
            guard spec.persist else {
                return parked(.conflict("a tun/tap device of that name exists that is not this daemon's "
                    + "(a non-persistent device does not outlive its daemon)"))
            }
            guard flags.contains(.persist) else {
                return parked(.conflict("a tun/tap device of that name is held by another process (it is not persistent)"))
            }
            let want = TunFlags.multiqueue(spec.kind, vnetHdr: spec.vnetHdr)
            let have = flags.intersection(.deviceFeatures)
            guard have == want else {
                return parked(.conflict("its tun_flags \(have.hex) differ from the state file's \(want.hex); "
                    + "attaching would rewrite them for every queue"))
            }
            join = true
        }
        var entry: DeviceEntry
        do {
            entry = try build(spec, ids: d.queues.map(\.id), limit: limit, key: state.takeKey(), join: join, state: &state)
        } catch {
            return parked(.failed(error.description))
        }
        do {
            for q in d.queues where !q.enabled { _ = try setEnabled(&entry, id: q.id, false) }
        } catch {
            if entry.persist && !join, let fd = entry.anyFD { try? driver.setPersist(fd, false) }
            release(entry)
            return parked(.failed(error.description))
        }
        return entry
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

    /// A worker's rate-limited report of failed reads or writes on a queue.
    fileprivate func reportErrors(device key: UInt64, queue qkey: UInt64, _ report: ErrorReport) {
        // Called on a worker thread: the log write (which may block) happens elsewhere.
        reaper.async { [weak self] in self?.logErrors(device: key, queue: qkey, report) }
    }

    private func logErrors(device key: UInt64, queue qkey: UInt64, _ report: ErrorReport) {
        let s = published.withLock { $0 }
        guard let entry = s.devices.values.first(where: { $0.key == key }) else { return }
        let id = entry.queues.values.first { $0.key == qkey }?.id
        logger.warning("queue i/o errors", metadata: [
            "device": "\(entry.name)", "queue": "\(id.map(String.init) ?? "?")", "errno": "\(report.errno.name)",
            "direction": "\(report.write ? "write" : "read")", "suppressed": "\(report.suppressed)",
        ])
    }

    fileprivate func scheduleLost(key: UInt64) {
        reaper.async { [weak self] in self?.deviceLost(key: key) }
    }

    /// Whether an active device was deleted behind our back (an inactive one has no fds).
    private func vanished(_ entry: DeviceEntry) -> Bool {
        guard entry.isActive, let fd = entry.anyFD else { return false }
        return !driver.isBound(fd)
    }

    private func drop(_ entry: DeviceEntry, from state: inout State, reason: String) {
        release(entry)
        state.devices[entry.name] = nil
        logger.warning("device gone", metadata: ["device": "\(entry.name)", "reason": "\(reason)"])
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
    ///
    /// A change that succeeded is saved to the state file before this returns; if that
    /// save fails, the caller gets `stateNotSaved` (the change itself stays made, and the
    /// next successful save records it).
    private func change<T>(_ body: (inout State) throws(ManagerError) -> T) throws(ManagerError) -> T {
        try control.withLock { (state) throws(ManagerError) -> T in
            defer {
                let copy = state
                published.withLock { $0 = copy }
            }
            let result = try body(&state)
            if let e = save(&state) { throw e }
            return result
        }
    }

    private func change<T>(_ body: (inout State) -> T) -> T {
        control.withLock { state in
            defer {
                let copy = state
                published.withLock { $0 = copy }
            }
            let result = body(&state)
            _ = save(&state)
            return result
        }
    }

    /// Writes the desired state if it changed; returns the error to report, if any.
    private func save(_ state: inout State) -> ManagerError? {
        guard let stateFile else { return nil }
        let desired = state.desired
        guard desired != state.saved else { return nil }
        do {
            try stateFile.save(desired)
            state.saved = desired
            return nil
        } catch {
            logger.error("state file not saved", metadata: ["path": "\(stateFile.path)", "errno": "\(error.errno.name)", "call": "\(error.call)"])
            return .stateNotSaved(path: stateFile.path, call: error.call, errno: error.errno)
        }
    }

    /// The device called `name`, dropping it first if it vanished behind our back.
    private func live(_ name: String, in state: inout State) throws(ManagerError) -> DeviceEntry {
        guard let entry = state.devices[name] else { throw .deviceNotFound(name: name) }
        if let reason = entry.status.reason { throw .deviceUnavailable(name: name, reason: reason) }
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

    /// Creates the kernel device with its queues (ids `ids`) and settings, or nothing.
    ///
    /// With `join`, the device exists already (a persistent one, after a restart): the
    /// queues attach to it and a failure leaves it as it was, persistent and queue-less.
    private func build(_ spec: DeviceSpec, ids: [Int], limit: Int, key: UInt64, join: Bool = false,
                       state: inout State) throws(ManagerError) -> DeviceEntry {
        precondition(!ids.isEmpty, "a device has at least one queue")
        let name = spec.name
        let flags = TunFlags.multiqueue(spec.kind, vnetHdr: spec.vnetHdr)
        // The first queue creates the device; IFF_TUN_EXCL makes the kernel refuse (EBUSY)
        // a name that exists, instead of silently joining that interface.
        let first: Int32
        do {
            first = try driver.openQueue(name: name, flags: join ? flags : flags.union(.exclusive))
        } catch where error.errno == .busy && !join {
            throw .nameConflict(name: name, errno: error.errno)
        } catch {
            throw ManagerError.from(error, device: name, step: .openQueue, queuesRequested: ids.count)
        }
        var persistSet = false
        // Undoes the device: persistence cleared, then the one fd we hold closed, which
        // makes the kernel destroy the device (a joined one stays, as it was).
        func discard() {
            if persistSet { try? driver.setPersist(first, false) }
            driver.close(first)
        }
        var mtu = 0
        var mac: MACAddress?
        var ifindex = 0
        do {
            if let m = spec.mac, !join || (try? driver.mac(name)) != m.bytes {
                try step(name, .setMAC) { () throws(SyscallError) in try driver.setMAC(name, m.bytes) }
            }
            if let m = spec.mtu {
                try step(name, .setMTU) { () throws(SyscallError) in try driver.setMTU(name, m) }
            }
            if spec.persist && !join {
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
        let since = Clock.timestamp()
        var entry = DeviceEntry(key: key, name: name, kind: spec.kind, maxQueues: limit, persist: spec.persist,
                                vnetHdr: spec.vnetHdr, mtu: mtu, mac: mac, up: false, mode: spec.mode,
                                ifindex: ifindex, queues: [:], since: since)
        // The first id goes to the fd that created (or joined) the device; the others join it.
        let q0 = QueueEntry(id: ids[0], key: state.takeKey(), fd: first, worker: pool.reserve(), enabled: true,
                            counters: CounterBlock(), since: since)
        do {
            try pool.startPolling(polled(q0, of: entry), on: q0.worker)
        } catch {
            pool.release(q0.worker)
            discard()
            throw ManagerError.from(error, device: name, step: .pollQueue)
        }
        entry.queues[q0.id] = q0
        do {
            let more = try openQueues(ids: Array(ids.dropFirst()), for: entry, state: &state)
            for q in more { entry.queues[q.id] = q }
            if spec.up {
                try step(name, .setLinkUp) { () throws(SyscallError) in try driver.setUp(name, true) }
                entry.up = true
            } else if join {
                try? driver.setUp(name, false)
            }
        } catch {
            if persistSet { try? driver.setPersist(first, false) }
            release(entry)
            throw error
        }
        return entry
    }

    /// Opens one queue per id on the existing device and starts polling them, or opens none.
    private func openQueues(ids: [Int], for entry: DeviceEntry, state: inout State) throws(ManagerError) -> [QueueEntry] {
        let flags = TunFlags.multiqueue(entry.kind, vnetHdr: entry.vnetHdr)
        var added: [QueueEntry] = []
        for id in ids {
            do {
                let fd = try driver.openQueue(name: entry.name, flags: flags)
                let q = QueueEntry(id: id, key: state.takeKey(), fd: fd, worker: pool.reserve(), enabled: true,
                                   counters: CounterBlock(), since: Clock.timestamp())
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
        PolledQueue(key: q.key, device: entry.key, fd: q.fd, counters: q.counters,
                    action: QueueAction.of(entry.mode, kind: entry.kind, vnetHdr: entry.vnetHdr))
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
        QueueInfo(id: q.id, enabled: q.enabled, worker: q.worker, counters: q.counters.read(), since: q.since)
    }

    static func info(_ e: DeviceEntry) -> DeviceInfo {
        DeviceInfo(name: e.name, kind: e.kind, maxQueues: e.maxQueues, persist: e.persist, vnetHdr: e.vnetHdr,
                   mtu: e.mtu, mac: e.mac, up: e.up, mode: e.mode, ifindex: e.ifindex,
                   queues: e.queues.values.sorted { $0.id < $1.id }.map(info), status: e.status, since: e.since)
    }
}

/// Forwards a worker's "device vanished" report to the manager without blocking the worker.
private final class GoneRelay: Sendable {
    private let target = Mutex<(@Sendable (UInt64) -> Void)?>(nil)

    func set(_ manager: DeviceManager) {
        target.withLock { $0 = { [weak manager] key in manager?.scheduleLost(key: key) } }
        errorTarget.withLock {
            $0 = { [weak manager] device, queue, report in manager?.reportErrors(device: device, queue: queue, report) }
        }
    }

    private let errorTarget = Mutex<(@Sendable (UInt64, UInt64, ErrorReport) -> Void)?>(nil)

    func forward(_ key: UInt64) {
        let t = target.withLock { $0 }
        t?(key)
    }

    func errors(_ device: UInt64, _ queue: UInt64, _ report: ErrorReport) {
        let t = errorTarget.withLock { $0 }
        t?(device, queue, report)
    }
}
