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
    let reports = DispatchQueue(label: "mqtapd.reports")
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
        changeUnrefused { model in
            if model.lifecycle == .starting { model.lifecycle = .serving }
        }
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

    /// A change that cannot be refused (the event path, restore, a lease's end): it runs
    /// whatever the manager's lifecycle, and a save error is logged, not thrown. The API's
    /// changes go through `change`, which is refused once the manager stops.
    @discardableResult
    func changeUnrefused<T>(_ body: (inout ManagerModel) -> T) -> T {
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
