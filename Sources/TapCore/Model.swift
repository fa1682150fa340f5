import TunKit

public typealias DeviceKind = TunKind

/// What a worker does with the frames it reads from a device's queues.
public enum DeviceMode: String, Sendable, Hashable, CaseIterable {
    /// Read, count, drop.
    case sink
    /// Write each frame back to the queue it came from; on TAP, swap the MAC addresses.
    case echo
    /// Write each frame, unchanged, into a queue of the peer device.
    case forward
    /// Read nothing: the daemon keeps the device and holds its own queues detached, so the
    /// processes that attach queues by name (libvirt `managed='no'`, QEMU `ifname=`) get
    /// every frame.
    case external
}

/// Who gets a device's frames: the kernel spreads them over every attached queue, whoever
/// holds it, so one consumer at a time.
public enum Consumer: String, Sendable, Hashable {
    /// The daemon's workers (`sink`, `echo`, `forward`).
    case daemon
    /// Processes that attach queues by name (`external`); the daemon's own are detached.
    case external
    /// The holders of the device's leases; the queues they do not hold are detached.
    case lease
}

/// Whether the daemon manages a device it knows of.
public enum DeviceStatus: Hashable, Sendable {
    /// Its queues are open and polled.
    case active
    /// Kept from the state file but not touched, because its name now belongs to another
    /// interface or its kernel flags differ from the state file's (attaching would rewrite
    /// them). The reason says which. Restarts try again; DELETE forgets it.
    case conflict(String)
    /// Kept from the state file, but bringing it back failed; the reason says why.
    case failed(String)
    /// Kept from the state file: the network namespace it lived in is gone, and it is never
    /// made anywhere else (a container's interface on the host). DELETE forgets it.
    case kept(String)

    public var name: String {
        switch self {
        case .active: return "active"
        case .conflict: return "conflict"
        case .failed: return "failed"
        case .kept: return "kept"
        }
    }

    public var reason: String? {
        switch self {
        case .active: return nil
        case .conflict(let r), .failed(let r), .kept(let r): return r
        }
    }
}

/// An Ethernet address.
public struct MACAddress: Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self.bytes = bytes
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (hex, either case).
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard p.count == 2, let b = UInt8(p, radix: 16) else { return nil }
            out.append(b)
        }
        bytes = out
    }

    public var isMulticast: Bool { bytes[0] & 1 == 1 }
    public var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

    public var description: String {
        bytes.map { b in
            let h = String(b, radix: 16)
            return h.count == 1 ? "0" + h : h
        }.joined(separator: ":")
    }
}

/// A device as a client asks for it. Defaults are the API's.
public struct DeviceSpec: Sendable, Hashable {
    public var name: String
    public var kind: DeviceKind = .tap
    public var queues: Int = 1
    /// nil: the global limit at creation time.
    public var maxQueues: Int?
    public var persist = false
    public var vnetHdr = false
    /// nil: the kernel's default.
    public var mtu: Int?
    /// nil: the kernel's random address (TAP); must be nil for TUN.
    public var mac: MACAddress?
    public var up = true
    public var mode: DeviceMode = .sink
    /// For `forward`: the device frames go to.
    public var peer: String?
    /// GSO/checksum offloads (TUNSETOFFLOAD): super-frames pass through; needs `vnetHdr`.
    public var offload = false
    /// Who else may attach queues (TUNSETOWNER, TUNSETGROUP): only this user, or members of
    /// this group (either, with both); nil: anyone who may open /dev/net/tun.
    public var owner: UInt32?
    public var group: UInt32?
    /// The network namespace to create it in: a path (`/run/netns/NAME`, `/proc/PID/ns/net`,
    /// a runtime's bind mount) or a bare name under /run/netns; nil: the daemon's own.
    public var netns: String?
    /// Its interface name in the kernel (nil: `name`): ten pods can each have a `tap0`, each
    /// with an API name of its own.
    public var ifname: String?
    /// false: a one-queue device without IFF_MULTI_QUEUE, which single-queue consumers open.
    public var multiQueue = true
    /// Who the device is for, as its creator says (a CNI plugin puts the container id here).
    public var labels: [String: String] = [:]

    /// The name the kernel has for it when it is made.
    public var kernelName: String { ifname ?? name }

    public init(name: String, kind: DeviceKind = .tap, queues: Int = 1, maxQueues: Int? = nil,
                persist: Bool = false, vnetHdr: Bool = false, mtu: Int? = nil, mac: MACAddress? = nil,
                up: Bool = true, mode: DeviceMode = .sink, peer: String? = nil, offload: Bool = false,
                owner: UInt32? = nil, group: UInt32? = nil) {
        self.owner = owner
        self.group = group
        self.peer = peer
        self.offload = offload
        self.name = name
        self.kind = kind
        self.queues = queues
        self.maxQueues = maxQueues
        self.persist = persist
        self.vnetHdr = vnetHdr
        self.mtu = mtu
        self.mac = mac
        self.up = up
        self.mode = mode
    }
}

/// A change to a device; nil fields stay as they are.
public struct DevicePatch: Sendable, Hashable {
    public var maxQueues: Int?
    public var up: Bool?
    public var mtu: Int?
    public var mode: DeviceMode?
    /// The queue count to have: queues added (smallest free ids) or removed (highest ids
    /// that are not leased).
    public var queues: Int?
    /// How many queues to have attached: the lowest ids, the rest detached.
    public var enabledQueues: Int?
    /// For `mode: forward`: the device frames go to.
    public var peer: String?

    public init(maxQueues: Int? = nil, up: Bool? = nil, mtu: Int? = nil, mode: DeviceMode? = nil,
                queues: Int? = nil, enabledQueues: Int? = nil, peer: String? = nil) {
        self.peer = peer
        self.maxQueues = maxQueues
        self.up = up
        self.mtu = mtu
        self.mode = mode
        self.queues = queues
        self.enabledQueues = enabledQueues
    }
}

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
    public let peer: PeerCredentials
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
    public var kernelError: SyscallError?
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
    public let netns: Netns.Place?
    /// Queues other processes attached by name (the kernel's count minus the daemon's own
    /// and its leases' orphans); they count toward the limits.
    public let foreignQueues: Int

    public init(name: String, netns: Netns.Place?, foreignQueues: Int) {
        self.name = name
        self.netns = netns
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
    public let kernelError: SyscallError?

    public init(queues: [QueueStats], total: CounterValues, kernel: [String: UInt64]?, kernelError: SyscallError? = nil) {
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

/// The rules the kernel applies silently (or not at all), checked before any syscall.
public enum Validate {
    /// 68 up to 65521, the kernel's TAP maximum (65535 less the Ethernet header). TUN would
    /// take 14 bytes more; one range for both keeps the rule simple to state and to check.
    public static let mtuRange = 68...65521

    /// Queue counts and limits: 1 up to the kernel's `MAX_TAP_QUEUES`.
    public static let queueCountRange = 1...Tun.kernelMaxQueues

    /// A count of queues (`queues`, `count`): within `queueCountRange`, so no later sum of
    /// counts can overflow.
    public static func queueCount(_ n: Int, field: String) throws(ManagerError) {
        guard queueCountRange.contains(n) else {
            throw .invalidField(field: field, reason: "must be between 1 and \(Tun.kernelMaxQueues)")
        }
    }

    /// 1–15 characters of `[A-Za-z0-9_.-]`, starting with a letter. The kernel would
    /// truncate a longer name and expand `%d`, and `/` or spaces would break sysfs paths.
    /// `field` is the request field that names a device (`name`, or `peer`).
    public static func name(_ name: String, field: String = "name") throws(ManagerError) {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty else {
            throw .invalidField(field: field, reason: "must not be empty")
        }
        guard bytes.count <= 15 else {
            throw .invalidField(field: field, reason: "must be at most 15 characters (IFNAMSIZ - 1)")
        }
        func isLetter(_ b: UInt8) -> Bool { (b >= 65 && b <= 90) || (b >= 97 && b <= 122) }
        guard isLetter(bytes[0]) else {
            throw .invalidField(field: field, reason: "must start with a letter")
        }
        for b in bytes where !(isLetter(b) || (b >= 48 && b <= 57) || b == 95 || b == 46 || b == 45) {
            throw .invalidField(field: field, reason: "may contain only letters, digits, '_', '.' and '-'")
        }
    }

    /// At most 16 labels; keys of 1–64 of `[A-Za-z0-9._/-]`, values of at most 256 characters.
    public static func labels(_ labels: [String: String]) throws(ManagerError) {
        guard labels.count <= 16 else { throw .invalidField(field: "labels", reason: "at most 16 labels") }
        for (k, v) in labels.sorted(by: { $0.key < $1.key }) {
            let ok = (1...64).contains(k.utf8.count) && k.utf8.allSatisfy { b in
                (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || b == 46 || b == 95 || b == 47 || b == 45
            }
            guard ok else { throw .invalidField(field: "labels", reason: "key '\(k)': 1-64 of A-Z a-z 0-9 . _ / -") }
            guard v.utf8.count <= 256, !v.utf8.contains(0) else {
                throw .invalidField(field: "labels", reason: "the value of '\(k)' must be at most 256 characters")
            }
        }
    }

    public static func mtu(_ mtu: Int) throws(ManagerError) {
        guard mtuRange.contains(mtu) else {
            throw .invalidField(field: "mtu", reason: "must be between \(mtuRange.lowerBound) and \(mtuRange.upperBound)")
        }
    }

    /// `max_queues` must be something the kernel could ever honour.
    public static func maxQueues(_ n: Int, field: String = "max_queues") throws(ManagerError) {
        try queueCount(n, field: field)
    }
}

/// The network namespace a device lives in, as a restart finds it again: the path it was
/// created with (or /run/netns's name for it) and the namespace's inode, so a namespace made
/// anew at the same path is never taken for the old one.
public struct NetnsHome: Hashable, Sendable {
    public var path: String?
    public var inode: UInt64

    public init(path: String?, inode: UInt64) {
        self.path = path
        self.inode = inode
    }
}
