import TunKit

/// One open queue of an active device.
struct QueueEntry: Sendable {
    let id: Int
    /// Unique for the daemon's life: how the manager names the queue to its worker.
    let key: UInt64
    let file: QueueHandle
    let worker: Int
    /// What the API last set (a revoke counts as disabling): what the queue goes back to
    /// when a lease ends. The kernel's own state is read from the fd (`Tun.isAttached`).
    var enabled: Bool
    let counters: CounterBlock
    /// When the counters started (the fd was opened): counters restart with the daemon.
    let since: String
    /// The lease that holds the queue: its holder reads and writes it, the workers do not.
    var lease: String?
    /// The attach state the daemon last knew the kernel to have (what it set, or what the
    /// observer saw): a difference is someone else's change, reported as an event.
    var knownAttached = true
    /// Held detached for another consumer of the device (its mode is `external`, or a lease
    /// lives): not read, and not attached whatever `enabled` says, until the daemon is the
    /// device's consumer again.
    var held = false

    /// Borrowed from `file`, which stays open while the entry is the manager's.
    var fd: Int32 { file.fd }

    /// Whether a worker reads the queue: attached through the API, not leased, not held.
    var polled: Bool { enabled && lease == nil && !held }

    /// The attach state the daemon wants the kernel to have for a queue that is not leased.
    var wantsAttached: Bool { enabled && !held }
}

/// A queue file the daemon took back from a revoked lease: its former holder may still have
/// the same open file, so the daemon never reads it again and keeps it detached (re-detached
/// whenever the holder attaches it) for as long as the device lives. Its fd keeps counting
/// toward the device's queues in the kernel.
struct RevokedQueue: Sendable {
    /// The queue id it had; the id now names a fresh queue.
    let id: Int
    let lease: String
    let file: QueueHandle
    /// Times the former holder re-attached it and the daemon detached it again.
    var refusals = 0
}

/// A leased queue the daemon has no fd of: its lease was recorded before a crash or a stop,
/// and the holder still has it. Counted toward the limits; never re-created or deleted.
struct OrphanQueue: Sendable {
    let id: Int
    /// What the API last set.
    var enabled: Bool
    let lease: String
}

/// A lease: queues handed to a holder for as long as its connection is open.
struct LeaseEntry: Sendable {
    let id: String
    /// Ordered by id.
    let queues: [Int]
    let holder: String?
    let peer: Peer
    let since: String
    /// Where the lease is in its life. It ends once (`Lease.end`, a revoke, or its device's
    /// end), and an ended lease is no longer in the model.
    enum State: Sendable {
        /// Granted: the fds are on their way, the upgrade not yet done.
        case offered
        /// Handed over: it lasts as long as this connection.
        case live(any LeaseConnection)
        /// Recorded before a restart: the holder may still have the queues; the daemon has
        /// no connection and no fd of them.
        case orphaned
    }
    var state: State

    var orphaned: Bool {
        if case .orphaned = state { return true }
        return false
    }

    /// The connection to close when the lease is taken away.
    var connection: (any LeaseConnection)? {
        if case .live(let c) = state { return c }
        return nil
    }

    var record: DesiredState.Lease {
        DesiredState.Lease(id: id, queues: queues, holder: holder, peer: peer, since: since)
    }

    var info: LeaseInfo {
        LeaseInfo(id: id, queues: queues, holder: holder, peer: peer, since: since, state: orphaned ? .orphaned : .live)
    }
}

/// A device whose queues the daemon holds in the kernel.
struct ActiveDevice: Sendable {
    let key: UInt64
    let name: String
    let kind: DeviceKind
    /// The device's own queue limit; nil: it follows the global limit as that changes.
    var ownMaxQueues: Int?
    let persist: Bool
    let vnetHdr: Bool
    var mtu: Int
    let mac: MACAddress?
    var up: Bool
    var mode: DeviceMode
    /// For `forward`: the device frames go to (by name: a new device of that name is picked up).
    var peer: String?
    /// For `forward`: what its workers write to now (the peer's queues, duplicated), set by
    /// `retarget` at the end of each change. Never in a reader's copy: a copy held past the
    /// change would keep a removed peer queue (or a deleted peer) alive in the kernel.
    var forwardTarget: ForwardTarget?
    let offload: Bool
    /// The offloads TUNSETOFFLOAD took.
    var offloads: Offloads = []
    /// As the kernel last said (a move to another namespace may change it).
    var ifindex: Int
    let owner: UInt32?
    let group: UInt32?
    /// The name the kernel has for it, as last seen through its fds: after a rename behind
    /// the daemon's back, not `name`. Saved, so that a restart finds a renamed device.
    var kernelName: String
    /// Queues others attached by name, as last seen.
    var foreignQueues = 0
    /// Where it was last seen.
    var place: Netns.Place?
    var queues: [Int: QueueEntry]
    /// Leased queues recorded before a restart, which the daemon holds no fd of.
    var orphans: [Int: OrphanQueue] = [:]
    var leases: [String: LeaseEntry] = [:]
    /// Files of revoked leases, kept detached (see `RevokedQueue`).
    var revoked: [RevokedQueue] = []
    /// What queues removed since the device was made had counted: the device's total keeps
    /// them, so it stays comparable with the kernel's counters.
    var retired = CounterValues()
    /// The device-wide settings as the kernel last showed them (nil: not read yet).
    var settings: DeviceSettings?
    /// The namespace it was made in (or was last seen moved to); nil: the daemon's own.
    var home: NetnsHome?
    var multiQueue = true
    var labels: [String: String] = [:]
    /// The interface name it was created with, when not its API name.
    var ifname: String?
    /// How the device is found when the daemon may hold no file of it (see `LinkAnchor`): a
    /// one-queue external device, or one restored with every queue a lease holder's.
    var anchor: LinkAnchor?

    /// A one-queue device in `external` mode: its one queue is its consumer's, never the
    /// daemon's.
    var externalSingle: Bool { !multiQueue && mode == .external }
    /// Why the workers do not read the device although the daemon is its consumer (its
    /// settings are not what they can read); nil: nothing stops them.
    var unreadable: String?
    let since: String

    /// Who gets the device's frames now.
    var consumer: Consumer {
        if !leases.isEmpty { return .lease }
        return mode == .external ? .external : .daemon
    }

    /// Every queue id the device has: the daemon's own and the orphaned ones.
    var queueCount: Int { queues.count + orphans.count }

    /// Queues the kernel counts that the daemon accounts for: its ids and the revoked files
    /// it keeps. The rest are foreign.
    var accountedQueues: Int { queueCount + revoked.count }

    /// Whether `id` names a queue, own or orphaned.
    func hasQueue(_ id: Int) -> Bool { queues[id] != nil || orphans[id] != nil }

    /// Any queue's fd: all are bound to the same device (a revoked file too).
    var anyFD: Int32? { anyFile?.fd }

    /// Any file of the device the daemon holds, to ask the kernel through.
    var anyFile: QueueHandle? { queues.values.first?.file ?? revoked.first?.file }

    /// The vnet header in front of every frame, not counted in bytes.
    var headerBytes: Int { vnetHdr ? QueueAction.vnetHeaderSize : 0 }

    var sortedQueues: [QueueEntry] { queues.values.sorted { $0.id < $1.id } }

    var desired: DesiredState.Device {
        var spec = DeviceSpec(name: name, kind: kind, queues: externalSingle ? 1 : queueCount, maxQueues: ownMaxQueues, persist: persist,
                              vnetHdr: vnetHdr, mtu: mtu, mac: mac, up: up, mode: mode, peer: peer, offload: offload,
                              owner: owner, group: group)
        spec.multiQueue = multiQueue
        spec.labels = labels
        spec.ifname = ifname
        spec.netns = home?.path
        var qs = queues.values.map { DesiredState.Queue(id: $0.id, enabled: $0.enabled) }
            + orphans.values.map { DesiredState.Queue(id: $0.id, enabled: $0.enabled) }
        // Its one queue is the consumer's: recorded so the entry says what the device has.
        if externalSingle { qs = [DesiredState.Queue(id: 0, enabled: true)] }
        // The kernel's name only where a restart may find the device again: a non-persistent one
        // without leases dies with the process, and a name it had then may be anyone's.
        let outlives = persist || !leases.isEmpty || externalSingle
        return DesiredState.Device(spec: spec, queues: qs.sorted { $0.id < $1.id },
                                   leases: leases.values.sorted { $0.id < $1.id }.map(\.record),
                                   kernelName: outlives && kernelName != spec.kernelName ? kernelName : nil, home: home)
    }
}

/// How the daemon finds a device it holds no queue of: a one-queue device in `external` mode,
/// whose one queue is its consumer's (the kernel lets one file attach to such a device), kept
/// alive by persistence. Found by its index in its namespace, whose fd is kept here.
final class LinkAnchor: Sendable {
    /// nil: the daemon's own namespace.
    let netns: NetnsFile?
    let ifindex: Int

    init(netns: NetnsFile?, ifindex: Int) {
        self.netns = netns
        self.ifindex = ifindex
    }
}

/// A device the state file names but the daemon does not hold: it was not touched in the
/// kernel, and only what the state file asks for is known.
struct KeptDevice: Sendable {
    enum Why: Error, Sendable {
        /// Its name belongs to something else, or its kernel flags differ (the reason says).
        case conflict(String)
        /// Bringing it back failed.
        case failed(ManagerError)
        /// The namespace it lived in is gone: it is made nowhere else.
        case netnsGone(String)
    }

    let key: UInt64
    let desired: DesiredState.Device
    let why: Why
    let since: String

    var status: DeviceStatus {
        switch why {
        case .conflict(let reason): return .conflict(reason)
        case .failed(let error): return .failed(error.description)
        case .netnsGone(let reason): return .kept(reason)
        }
    }
}

/// Every device the manager knows: held, or kept from the state file.
enum DeviceEntry: Sendable {
    case active(ActiveDevice)
    case kept(KeptDevice)

    var name: String {
        switch self {
        case .active(let d): return d.name
        case .kept(let k): return k.desired.spec.name
        }
    }

    var key: UInt64 {
        switch self {
        case .active(let d): return d.key
        case .kept(let k): return k.key
        }
    }

    var active: ActiveDevice? {
        if case .active(let d) = self { return d }
        return nil
    }

    var desired: DesiredState.Device {
        switch self {
        case .active(let d): return d.desired
        case .kept(let k): return k.desired
        }
    }

    /// Queues the device holds or asks for (a kept device's count toward the limits).
    var queueCount: Int { desired.queues.count }

    /// The device's own limit; nil: it follows the global one.
    var ownMaxQueues: Int? { desired.spec.maxQueues }
}

/// The limit a device has now: its own, capped by the global one while that is lower; or the
/// global one, for a device that follows it.
func queueLimit(own: Int?, global: Int) -> Int { min(own ?? global, global) }

/// Whether the manager accepts changes.
public enum ManagerState: String, Sendable {
    /// Restoring the state file; changes are accepted (the API does not serve yet).
    case starting
    case serving
    /// Shutting down: changes are refused (`shuttingDown`).
    case stopping
    case stopped
}

/// Everything the manager decides on, under its one lock.
struct ManagerModel: Sendable {
    var devices: [String: DeviceEntry] = [:]
    var maxQueues: Int
    var nextKey: UInt64 = 1
    /// What the state file holds now; a change is saved only when this differs.
    var saved: DesiredState?
    var lifecycle = ManagerState.starting

    init(maxQueues: Int) { self.maxQueues = maxQueues }

    var desired: DesiredState { desired(adding: nil) }

    /// The state to save, with `extra` (a device about to be made) among the devices.
    func desired(adding extra: DesiredState.Device?) -> DesiredState {
        let all = devices.values.map(\.desired) + (extra.map { [$0] } ?? [])
        return DesiredState(maxQueues: maxQueues, devices: all.sorted { $0.spec.name < $1.spec.name })
    }

    mutating func takeKey() -> UInt64 {
        defer { nextKey += 1 }
        return nextKey
    }

    /// The model as readers get it: without the forward targets (see `ActiveDevice.forwardTarget`).
    var forReaders: ManagerModel {
        var copy = self
        for case .active(let d) in devices.values where d.forwardTarget != nil {
            copy.devices[d.name] = .active(d.forReaders)
        }
        return copy
    }
}

extension ActiveDevice {
    /// The device as readers get it: without its forward target.
    var forReaders: ActiveDevice {
        var copy = self
        copy.forwardTarget = nil
        return copy
    }
}

// MARK: - Views

extension QueueEntry {
    /// `attached`: the kernel's attach state as read from the fd (nil: use `enabled`).
    func info(attached: Bool? = nil, leaseState: LeaseState? = nil) -> QueueInfo {
        QueueInfo(id: id, enabled: attached ?? enabled, worker: worker, counters: counters.read(), since: since,
                  lease: lease, leaseState: lease == nil ? nil : (leaseState ?? .live))
    }

    var info: QueueInfo { info() }
}

extension OrphanQueue {
    var info: QueueInfo {
        QueueInfo(id: id, enabled: enabled, worker: nil, counters: CounterValues(), since: nil, lease: lease,
                  leaseState: .orphaned)
    }
}

extension KeptDevice {
    /// The device as the API shows it, from what the state file asks for (an active one is
    /// shown by `DeviceManager.view`, from the kernel); `global`: the global queue limit now.
    func info(global: Int) -> DeviceInfo {
        let s = desired.spec
        var info = DeviceInfo(name: s.name, kind: s.kind, maxQueues: queueLimit(own: s.maxQueues, global: global),
                              maxQueuesSource: s.maxQueues == nil ? .global : .device, persist: s.persist,
                              vnetHdr: s.vnetHdr, mtu: s.mtu, mac: s.mac, up: s.up, mode: s.mode, peer: s.peer,
                              peerState: nil, offload: s.offload, offloads: [], ifindex: nil, owner: s.owner,
                              group: s.group, kernel: nil, queues: [], status: status, since: since)
        info.home = desired.home
        info.multiQueue = s.multiQueue
        info.labels = s.labels
        return info
    }
}
