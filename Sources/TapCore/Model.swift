import TunKit

/// TAP (Ethernet frames) or TUN (IP packets).
public enum DeviceKind: String, Sendable, Hashable, CaseIterable {
    case tap
    case tun

    /// The same, as the syscall layer names it.
    var tunKind: TunKind { self == .tap ? .tap : .tun }
}

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
