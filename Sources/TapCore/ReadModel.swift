import TunKit

// What the manager's reads answer: devices, queues, leases, counters and limits as they are.

/// Per-queue counters, as seen from the queue fd's side.
public struct CounterValues: Hashable, Sendable {
    /// Frames the daemon read from the queue (the kernel transmitted them into the device).
    public var rxPackets: UInt64 = 0
    public var rxBytes: UInt64 = 0
    /// Frames the daemon wrote into the queue.
    public var txPackets: UInt64 = 0
    public var txBytes: UInt64 = 0
    public var rxErrors: UInt64 = 0
    public var txErrors: UInt64 = 0
    /// Frames read from the queue that could not be forwarded to the peer.
    public var dropped: UInt64 = 0

    public init() {}

    public static func + (a: CounterValues, b: CounterValues) -> CounterValues {
        var s = a
        s.rxPackets &+= b.rxPackets
        s.rxBytes &+= b.rxBytes
        s.txPackets &+= b.txPackets
        s.txBytes &+= b.txBytes
        s.rxErrors &+= b.rxErrors
        s.txErrors &+= b.txErrors
        s.dropped &+= b.dropped
        return s
    }
}

public struct QueueInfo: Hashable, Sendable {
    /// The daemon's id, stable for the queue's life (the kernel's index is not).
    public let id: Int
    /// Attached, as the kernel has it (read from the daemon's fd of the queue).
    public let enabled: Bool
    /// Index of the worker thread that polls this queue; nil for an orphaned leased queue
    /// (the daemon has no fd of it).
    public let worker: Int?
    public let counters: CounterValues
    /// When the counters started: when the queue was opened (counters restart with the
    /// daemon); nil for an orphaned leased queue.
    public let since: String?
    /// The lease that holds the queue, if any.
    public let lease: String?
    public let leaseState: LeaseState?

    public var leased: Bool { lease != nil }
}

/// A lease is live while its connection is open; one recorded before a restart is orphaned.
public enum LeaseState: String, Sendable, Hashable {
    case live
    case orphaned
}

/// What a client asks for when it takes a lease.
public struct LeaseRequest: Sendable, Hashable {
    /// nil: every queue of the device.
    public var queues: [Int]?
    public var holder: String?

    public init(queues: [Int]? = nil, holder: String? = nil) {
        self.queues = queues
        self.holder = holder
    }
}

public struct LeaseInfo: Hashable, Sendable {
    public let id: String
    public let queues: [Int]
    public let holder: String?
    /// Who took it (SO_PEERCRED at lease time).
    public let peer: Peer
    public let since: String
    public let state: LeaseState
}

/// Whether a forwarding device's peer is there to write to.
public enum PeerState: String, Sendable, Hashable {
    case active
    /// No active device has the name: frames are dropped (and counted) until one has.
    case missing
}

/// Where a device's queue limit comes from.
public enum MaxQueuesSource: String, Sendable, Hashable {
    /// It follows the global limit as that changes.
    case global
    /// Its own, given at creation or by a PATCH (capped by the global limit while that is lower).
    case device
}

public struct DeviceInfo: Hashable, Sendable {
    public let name: String
    public let kind: DeviceKind
    /// The limit in force now.
    public let maxQueues: Int
    public let maxQueuesSource: MaxQueuesSource
    public let persist: Bool
    public let vnetHdr: Bool
    /// nil for a kept device whose state file entry names none.
    public let mtu: Int?
    /// nil for TUN devices, which have no link-layer address.
    public let mac: MACAddress?
    public let up: Bool
    public let mode: DeviceMode
    public let peer: String?
    /// Whether the peer is there to forward to (`active`) or not (`missing`); nil unless
    /// forwarding.
    public let peerState: PeerState?
    public let offload: Bool
    /// What TUNSETOFFLOAD set: `csum`, `tso4`, `tso6`, `uso4`, `uso6`.
    public let offloads: [String]
    /// nil for a device that is not active (it is not held in the kernel).
    public let ifindex: Int?
    public let owner: UInt32?
    public let group: UInt32?
    /// What the kernel says about the device now; nil for a device that is not active.
    public let kernel: KernelView?
    /// Ordered by id.
    public let queues: [QueueInfo]
    public let status: DeviceStatus
    /// When the daemon (re)started managing the device.
    public let since: String
    /// Who gets its frames now.
    public var consumer: Consumer = .daemon
    /// The vnet header size the kernel has for it now (nil: not read).
    public var vnetHdrSize: Int?
    /// Settings where the kernel differs from what the API set (`vnet_hdr_size`,
    /// `vnet_byte_order`, `owner`, `group`): a holder changed them.
    public var settingsDiffer: [String] = []
    /// Files of revoked leases the daemon keeps detached (their former holders may still
    /// have them).
    public var revokedQueues = 0
    /// Why the workers do not read the device, if they do not although it is theirs.
    public var unreadable: String?
    /// Where it was created (or last seen moved to), as the state file keeps it.
    public var home: NetnsHome?
    public var multiQueue = true
    public var labels: [String: String] = [:]
    /// A kernel read for this view that failed: the values beside it are the last recorded.
    public var kernelError: KernelError?
    /// The kernel's counters of the link, read with the view (nil if not read).
    public var kernelStatistics: [String: UInt64]?

    public var queueCount: Int { queues.count }
    public var enabledQueues: Int { queues.lazy.filter(\.enabled).count }

    /// Why the device is not plainly as created: a kept device's reason, or a rename.
    public var stateReason: String? {
        if let r = status.reason { return r }
        if let k = kernel, k.name != name {
            return "renamed in the kernel to \(k.name); the API keeps the name it was created with"
        }
        if let r = unreadable { return r }
        if let k = kernel, k.foreignQueues > 0, consumer == .daemon {
            return "\(k.foreignQueues) queues attached by name by other processes: the kernel splits the frames between them "
                + "and the daemon's workers; use mode external for consumers that attach by name"
        }
        if !settingsDiffer.isEmpty {
            return "settings changed by a holder: \(settingsDiffer.joined(separator: ", ")); put back when the last holder goes"
        }
        return nil
    }
}

/// An active device as the kernel has it, found through the daemon's own queue fds (never by
/// the name it was created with, which another interface may have taken).
public struct KernelView: Hashable, Sendable {
    /// Its name now (`ip link set … name` changes it).
    public let name: String
    /// The network namespace it is in now (`ip link set … netns` moves it).
    public let netns: NetnsPlace?
    /// Queues other processes attached by name (the kernel's count minus the daemon's own
    /// and its leases' orphans); they count toward the limits.
    public let foreignQueues: Int

    init(name: String, netns: Netns.Place?, foreignQueues: Int) {
        self.name = name
        self.netns = netns.map(NetnsPlace.init)
        self.foreignQueues = foreignQueues
    }
}

public struct QueueStats: Hashable, Sendable {
    public let id: Int
    public let counters: CounterValues
}

public struct DeviceStats: Hashable, Sendable {
    public let queues: [QueueStats]
    public let total: CounterValues
    /// `/sys/class/net/<dev>/statistics`: the kernel's view of the whole device; nil if it
    /// could not be read (`kernelError` says why).
    public let kernel: [String: UInt64]?
    public let kernelError: KernelError?

    public init(queues: [QueueStats], total: CounterValues, kernel: [String: UInt64]?, kernelError: KernelError? = nil) {
        self.queues = queues
        self.total = total
        self.kernel = kernel
        self.kernelError = kernelError
    }
}

public struct LimitsInfo: Hashable, Sendable {
    /// The configurable per-device queue limit; every device's `max_queues` is at most this.
    public let maxQueues: Int
    /// The kernel's `MAX_TAP_QUEUES`.
    public let kernelMaxQueues: Int
    public let devices: Int
    /// Queues held by all devices, detached ones included (they count toward the limit).
    public let queuesInUse: Int
    public let openFiles: Int
    public let openFilesLimit: UInt64
}

/// A kernel read that failed, as a read reports it: the call, the errno's name and its text.
public struct KernelError: Hashable, Sendable {
    public let call: String
    /// The errno's symbolic name (`EACCES`).
    public let errno: String
    public let message: String

    init(_ e: SyscallError) {
        call = e.call
        errno = e.errno.name
        message = e.errno.message
    }
}

/// The network namespace a device is in: its inode, its name under /run/netns if it has one,
/// and whether it is the daemon's own.
public struct NetnsPlace: Hashable, Sendable {
    public let inode: UInt64
    public let name: String?
    public let isOwn: Bool

    init(_ p: Netns.Place) {
        inode = p.inode
        name = p.name
        isOwn = p.isOwn
    }
}

/// The process at the other end of a lease's connection (SO_PEERCRED).
public struct Peer: Sendable, Hashable {
    public let pid: Int32
    public let uid: UInt32
    public let gid: UInt32

    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }
}
