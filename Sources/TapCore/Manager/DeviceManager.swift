import Dispatch
import Logging
import Synchronization
import TunKit

/// The single owner of every device, queue fd and limit.
///
/// Every change runs under one lock (`control`), is decided before the kernel is touched
/// where it can be, and undoes a half-done step through one `Rollback`: every fd it opened
/// is closed, no device it made remains. Reads never take that lock and never change
/// anything: they copy the state last published (`published`) and read counters lock-free,
/// so a long change (a 256-queue create) never stalls a stats request. A device deleted
/// behind the daemon's back is dropped on the worker-event path (`deviceLost`), under the
/// lock, as soon as a worker (or a read that finds it gone) reports it.
public final class DeviceManager: Sendable {
    let driver: any TunDriver
    let pool: WorkerPool
    let control: Mutex<ManagerModel>
    let published: Mutex<ManagerModel>
    let logger: Logger
    /// Where worker reports are handled, off the worker threads.
    let events = DispatchQueue(label: "mqtapd.events")
    let stateFile: StateFile?
    let features: TunFlags
    /// Every change, for watchers.
    public let journal: EventJournal
    /// Looks for attach-state changes made outside the API (a lease holder's TUNSETQUEUE).
    private let observer = Mutex<PeriodicThread?>(nil)
    /// The observer's rounds: some looks are taken only every few.
    let observeTicks = Atomic<Int>(0)
    /// Live leases the daemon takes, over all devices (their connections are counted apart
    /// from the API's).
    public let maxLeases: Int

    /// Starts `workers` worker threads (default: one per online CPU) with a global queue
    /// limit of `maxQueues` (default: the kernel's 256). With a `stateFile`, every accepted
    /// change is saved to it before the call returns (see `restore` for the way back).
    /// Fails if the kernel lacks a tun feature the daemon needs (`TUNGETFEATURES`).
    public init(driver: any TunDriver = LinuxTunDriver(),
                workers: Int = ProcessResources.onlineCPUs(),
                maxQueues: Int = Tun.kernelMaxQueues,
                stateFile: StateFile? = nil,
                eventRetention: Int = 4096,
                maxLeases: Int = 1024,
                logger: Logger = Logger(label: "mqtapd", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        try Validate.maxQueues(maxQueues)
        guard workers >= 1 else { throw ManagerError.invalidField(field: "workers", reason: "must be at least 1") }
        let features = try driver.features()
        if let missing = TunFlags.required.subtracting(features).names.first {
            throw ManagerError.featureMissing(feature: missing, field: nil)
        }
        self.features = features
        self.driver = driver
        guard maxLeases >= 1 else { throw ManagerError.invalidField(field: "max_leases", reason: "must be at least 1") }
        self.maxLeases = maxLeases
        guard eventRetention >= 1 else {
            throw ManagerError.invalidField(field: "event_retention", reason: "must be at least 1")
        }
        journal = EventJournal(retention: eventRetention)
        self.logger = logger
        self.stateFile = stateFile
        // The pool reports vanished devices before `self` exists; the relay is pointed at
        // the manager once it does.
        let relay = WorkerRelay()
        pool = try WorkerPool(count: workers, onGone: { key in relay.gone(key) },
                              onErrors: { key, queue, report in relay.errors(key, queue, report) })
        let model = ManagerModel(maxQueues: maxQueues)
        control = Mutex(model)
        published = Mutex(model)
        relay.set(self)
        let observing = try PeriodicThread(name: "mqtapd-observe", every: 0.2) { [weak self] in self?.observe() }
        observer.withLock { $0 = observing }
    }

    /// A manager dropped without `shutdown()` still closes its fds and joins its workers.
    deinit { shutdown() }

    public var workerCount: Int { pool.count }

    /// Where the manager is in its life.
    public var state: ManagerState { published.withLock { $0.lifecycle } }

    /// Start is over (the state file is restored): the daemon serves.
    public func serving() {
        change { model in
            if model.lifecycle == .starting { model.lifecycle = .serving }
        }
    }

    // MARK: - Reads (never wait for a change in progress, never change anything)

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
            return DeviceStats(queues: queues, total: total, kernel: nil, kernelError: error)
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
        guard case .active(var d) = entry else { return entry.info(global: global) }
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
        info.kernelError = kernelError
        info.kernelStatistics = statistics
        return info
    }

    /// Runs `read` on one of the device's files while it is open. nil when the file was
    /// closed since the snapshot, or the device went (EBADFD): the workers, or the next read,
    /// report that. Any other failure is thrown.
    func read<T>(through file: QueueHandle, _ read: (Int32) throws(SyscallError) -> T?) throws(SyscallError) -> T? {
        let r = file.withOpenFD { fd -> Result<T?, SyscallError> in
            do throws(SyscallError) {
                return .success(try read(fd))
            } catch {
                return error.errno == .badFileDescriptorState ? .success(nil) : .failure(error)
            }
        }
        return try (r ?? .success(nil)).get()
    }

    /// The device's link and namespace, through a queue fd while it is open (the snapshot
    /// may be older than a close), or through its anchor; nil if there is neither or the
    /// device went.
    func lookUp(_ d: ActiveDevice) throws(SyscallError) -> (LinkInfo, Netns.Place)? {
        if d.anyFile == nil, let a = d.anchor {
            guard let link = try anchoredLink(a) else { return nil }
            let own = a.netns == nil
            let inode = if let ns = a.netns { ns.inode } else { try Netns.currentInode() }
            return (link, Netns.Place(inode: inode, name: own ? nil : Netns.name(ofInode: inode), isOwn: own))
        }
        guard let file = d.anyFile else { return nil }
        return try read(through: file) { fd throws(SyscallError) -> (LinkInfo, Netns.Place)? in
            guard let link = try link(of: fd) else { return nil }
            return (link, try driver.place(of: fd))
        }
    }

    /// The link of a device the daemon holds no queue of, by its index in its namespace; nil
    /// if it is gone.
    func anchoredLink(_ a: LinkAnchor) throws(SyscallError) -> LinkInfo? {
        let driver = self.driver
        let ifindex = a.ifindex
        return try driver.inNamespace(a.netns?.fd) { () throws(SyscallError) -> LinkInfo? in try driver.link(ifindex: ifindex) }
    }

    /// Runs a by-name step on `d` wherever it is: through one of its files (the name it has
    /// now, in its namespace); when the daemon holds none, through its anchor (its index in its
    /// namespace); with neither, by the name last seen. The one way by-name steps reach a device.
    func onDevice<T: Sendable>(_ d: ActiveDevice, _ body: @escaping @Sendable (String) throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        if let fd = d.anyFD { return try onLink(fd, body) }
        if let a = d.anchor { return try onAnchor(a, body) }
        return try body(d.kernelName)
    }

    /// Runs a by-name step on an anchored device: with the name it has now, in its namespace.
    func onAnchor<T: Sendable>(_ a: LinkAnchor, _ body: @escaping @Sendable (String) throws(SyscallError) -> T) throws(SyscallError) -> T {
        let driver = self.driver
        let ifindex = a.ifindex
        return try driver.inNamespace(a.netns?.fd) { () throws(SyscallError) -> T in
            guard let link = try driver.link(ifindex: ifindex) else {
                throw SyscallError(call: "RTM_GETLINK(\(ifindex))", errno: .noDevice)
            }
            return try body(link.name)
        }
    }

    /// The link of the device `fd` (one of its queues) belongs to, wherever it is now; nil if
    /// it is gone.
    func link(of fd: Int32) throws(SyscallError) -> LinkInfo? {
        let driver = self.driver
        return try onLink(fd) { name throws(SyscallError) in try driver.link(named: name) }
    }

    /// Queues of the device that neither the daemon nor a lease's orphan accounts for: the
    /// kernel counts every attached and detached queue, whoever holds it.
    func foreignQueues(_ d: ActiveDevice, _ link: LinkInfo) -> Int {
        guard let tun = link.tun else { return 0 }
        return max(0, tun.queues - d.accountedQueues)
    }

    /// The device's link now, for a change (under the control lock): a link the kernel does
    /// not give is refused, never taken as empty. A device gone behind the daemon's back is
    /// not found (and dropped on the event path).
    func currentLink(_ d: ActiveDevice) throws(ManagerError) -> LinkInfo {
        let driver = self.driver
        let found: LinkInfo?
        do throws(SyscallError) {
            found = try onDevice(d) { n throws(SyscallError) in try driver.link(named: n) }
        } catch where error.errno == .badFileDescriptorState || error.errno == .noDevice {
            found = nil
        } catch {
            throw .from(error, device: d.name, step: .countQueues)
        }
        guard let found else {
            scheduleLost(key: d.key)
            throw .deviceNotFound(name: d.name)
        }
        return found
    }

    /// Queues others attached, asked of the kernel now: for the limits of a change, so a
    /// count the kernel does not give is refused (never counted as 0).
    func foreignQueues(_ d: ActiveDevice) throws(ManagerError) -> Int {
        foreignQueues(d, try currentLink(d))
    }

    /// The same, for the steps that cannot refuse (a lease's end): nil, logged, when the
    /// kernel does not give the count.
    func foreignQueuesLogged(_ d: ActiveDevice) -> Int? {
        do throws(ManagerError) {
            return try foreignQueues(d)
        } catch {
            logger.error("queues attached by name not counted", metadata: ["device": "\(d.name)", "error": "\(error)"])
            return nil
        }
    }

    /// Runs `body` with the name the device of `fd` has now (TUNGETIFF on the fd), in the
    /// namespace the device is in now: by-name calls then reach that device and never an
    /// interface that took its old name, here or there.
    func onLink<T: Sendable>(_ fd: Int32, _ body: @escaping @Sendable (String) throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        let name = try driver.boundName(fd)
        if let v = try driver.inDeviceNamespace(fd, { () throws(SyscallError) -> T in try body(name) }) { return v }
        return try body(name)
    }

    /// The kernel's counters of the device, found through its own fd; nil if it is gone.
    func linkStatistics(_ d: ActiveDevice) throws(SyscallError) -> [String: UInt64]? {
        if d.anyFile == nil, let a = d.anchor { return try anchoredLink(a)?.statistics }
        guard let file = d.anyFile else { return nil }
        return try read(through: file) { fd throws(SyscallError) in try link(of: fd)?.statistics }
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

    func vanished(_ entry: DeviceEntry) -> Bool {
        // An anchored device is gone when its index is (a failed look says nothing).
        if entry.active?.anyFile == nil, let a = entry.active?.anchor,
           case .success(nil) = Result(catching: { () throws(SyscallError) in try anchoredLink(a) }) {
            return true
        }
        guard let file = entry.active?.anyFile else { return false }
        // A queue closed since the snapshot was taken says nothing: not vanished.
        return file.withOpenFD { !driver.isBound($0) } ?? false
    }

    /// The kernel's attach state of a queue, read from the daemon's fd: nil if it was closed
    /// since the snapshot or the device went, a failure if the kernel refused.
    func attached(_ q: QueueEntry) -> Result<Bool?, SyscallError> {
        let driver = self.driver
        return Result { () throws(SyscallError) in try read(through: q.file) { fd throws(SyscallError) in try driver.isAttached(fd) } }
    }

    // MARK: - The one way to change

    /// Runs a change under the control lock and publishes the state it leaves, whether it
    /// succeeded or not (a failed change leaves the state as it was). Refused once the
    /// manager is stopping.
    ///
    /// A change that succeeded is saved to the state file before this returns; if that
    /// save fails, the caller gets `stateNotSaved` (the change itself stays made, and the
    /// next successful save records it).
    func change<T>(_ body: (inout ManagerModel) throws(ManagerError) -> T) throws(ManagerError) -> T {
        try control.withLock { (model) throws(ManagerError) -> T in
            guard model.lifecycle == .starting || model.lifecycle == .serving else { throw .shuttingDown }
            // Events go out after the state they describe is published, and only if the change
            // was made (a change whose state file was not saved was made).
            journal.hold()
            var made = false
            defer {
                let copy = model.forReaders
                published.withLock { $0 = copy }
                journal.release(deliver: made)
            }
            let result = try body(&model)
            made = true
            // Whatever changed, the forwarders write to what their peers have now.
            retarget(&model)
            if let e = save(&model) { throw e }
            return result
        }
    }

    /// A change that cannot be refused (the event path, restore): the save error is logged.
    @discardableResult
    func change<T>(_ body: (inout ManagerModel) -> T) -> T {
        control.withLock { model in
            journal.hold()
            defer {
                let copy = model.forReaders
                published.withLock { $0 = copy }
                journal.release(deliver: true)
            }
            let result = body(&model)
            retarget(&model)
            _ = save(&model)
            return result
        }
    }

    /// Writes the desired state if it changed; returns the error to report, if any.
    func save(_ model: inout ManagerModel, adding extra: DesiredState.Device? = nil) -> ManagerError? {
        guard let stateFile, model.lifecycle == .starting || model.lifecycle == .serving else { return nil }
        let desired = model.desired(adding: extra)
        guard desired != model.saved else { return nil }
        do {
            try stateFile.save(desired)
            model.saved = desired
            return nil
        } catch {
            logger.error("state file not saved", metadata: ["path": "\(stateFile.path)", "errno": "\(error.errno.name)", "call": "\(error.call)"])
            return .stateNotSaved(path: stateFile.path, call: error.call, errno: error.errno)
        }
    }

    /// The active device called `name` (a kept one is refused). One that is gone behind
    /// our back but not reported yet is dropped here: a change holds the lock anyway.
    func active(_ name: String, in model: inout ManagerModel) throws(ManagerError) -> ActiveDevice {
        switch model.devices[name] {
        case nil: throw .deviceNotFound(name: name)
        case .kept(let k)?: throw .deviceNotActive(name: name, status: k.status)
        case .active(let d)?:
            guard !vanished(.active(d)) else {
                drop(.active(d), from: &model)
                throw .deviceNotFound(name: name)
            }
            return d
        }
    }

    /// Runs one kernel step, naming it in the error.
    func step<T>(_ device: String, _ step: DeviceStep, queues: Int = 0,
                 _ body: () throws(SyscallError) -> T) throws(ManagerError) -> T {
        do {
            return try body()
        } catch {
            throw ManagerError.from(error, device: device, step: step, queuesRequested: queues)
        }
    }

    // MARK: - Stop

    /// Refuses changes from now on, stops the workers and closes every fd: non-persistent
    /// devices disappear with their last fd; persistent ones stay. The state file keeps every
    /// device, so the next start brings them all back. Idempotent.
    public func shutdown() {
        let first = control.withLock { model -> Bool in
            guard model.lifecycle != .stopping && model.lifecycle != .stopped else { return false }
            model.lifecycle = .stopping
            let copy = model.forReaders
            published.withLock { $0 = copy }
            return true
        }
        guard first else { return }
        observer.withLock { $0 }?.stop()
        control.withLock { model in
            for case .active(let d) in model.devices.values.sorted(by: { $0.name < $1.name }) {
                release(d)
                logger.info("device released", metadata: ["device": "\(d.name)", "persist": "\(d.persist)"])
            }
            model.devices = [:]
            pool.shutdown()
            model.lifecycle = .stopped
            let copy = model.forReaders
            published.withLock { $0 = copy }
        }
    }
}
