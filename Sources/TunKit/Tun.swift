#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// TUN (layer 3) or TAP (layer 2).
public enum TunKind: String, Sendable, Hashable, CaseIterable {
    case tap
    case tun
}

/// The `ifr_flags` bits of TUNSETIFF that the daemon uses.
public struct TunFlags: OptionSet, Sendable, Hashable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let tun = TunFlags(rawValue: mqt_IFF_TUN)
    public static let tap = TunFlags(rawValue: mqt_IFF_TAP)
    public static let noPI = TunFlags(rawValue: mqt_IFF_NO_PI)
    public static let vnetHdr = TunFlags(rawValue: mqt_IFF_VNET_HDR)
    public static let multiQueue = TunFlags(rawValue: mqt_IFF_MULTI_QUEUE)
    /// Refuse (EBUSY) if the name already exists, instead of joining that device.
    public static let exclusive = TunFlags(rawValue: mqt_IFF_TUN_EXCL)
    public static let persist = TunFlags(rawValue: mqt_IFF_PERSIST)

    /// The flags every queue of one device must agree on (the kernel rewrites them for all
    /// queues on each attach): what `tun_flags` in sysfs is compared against.
    public static let deviceFeatures: TunFlags = [.tun, .tap, .noPI, .vnetHdr, .multiQueue]

    /// What the daemon cannot work without: multiqueue TAP and TUN devices.
    public static let required: TunFlags = [.tun, .tap, .multiQueue, .noPI]

    /// The kernel's names of the flags that are set, e.g. `["IFF_TAP", "IFF_MULTI_QUEUE"]`.
    public var names: [String] {
        let known: [(TunFlags, String)] = [
            (.tun, "IFF_TUN"), (.tap, "IFF_TAP"), (.noPI, "IFF_NO_PI"), (.vnetHdr, "IFF_VNET_HDR"),
            (.multiQueue, "IFF_MULTI_QUEUE"), (.exclusive, "IFF_TUN_EXCL"), (.persist, "IFF_PERSIST"),
        ]
        return known.filter { contains($0.0) }.map(\.1)
    }

    /// As sysfs prints them: `0x1102`.
    public var hex: String { "0x" + String(rawValue, radix: 16) }

    /// The flags of a device of `kind` as the daemon creates it: multiqueue unless
    /// `multiQueue` is false (a one-queue device that single-queue consumers, such as
    /// libvirt with one queue, can open by name).
    public static func multiqueue(_ kind: TunKind, vnetHdr: Bool, multiQueue: Bool = true) -> TunFlags {
        var f: TunFlags = [kind == .tap ? .tap : .tun, .noPI]
        if multiQueue { f.insert(.multiQueue) }
        if vnetHdr { f.insert(.vnetHdr) }
        return f
    }
}

/// The offloads a TAP device takes with TUNSETOFFLOAD (`TUN_F_*`): the kernel then hands over,
/// and takes, frames with partial checksums and GSO super-frames (up to 64 KiB) behind a
/// virtio-net header.
public struct TunOffloads: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let csum = TunOffloads(rawValue: 0x01)
    public static let tso4 = TunOffloads(rawValue: 0x02)
    public static let tso6 = TunOffloads(rawValue: 0x04)
    public static let uso4 = TunOffloads(rawValue: 0x20)
    public static let uso6 = TunOffloads(rawValue: 0x40)

    /// As the API shows them.
    public var names: [String] {
        let all: [(TunOffloads, String)] = [(.csum, "csum"), (.tso4, "tso4"), (.tso6, "tso6"), (.uso4, "uso4"), (.uso6, "uso6")]
        return all.filter { contains($0.0) }.map(\.1)
    }
}

/// The tun driver's character device, one open per queue.
public enum Tun {
    public static let devicePath = "/dev/net/tun"

    /// The kernel's `MAX_TAP_QUEUES`: queues (attached or detached) one device can have.
    public static let kernelMaxQueues = 256

    /// Opens `/dev/net/tun` non-blocking and binds it to `name` as one more queue.
    /// On failure the fd is closed before the error is thrown: the caller owns nothing.
    /// The corresponding C calls are `open(2)` and `ioctl(TUNSETIFF)`.
    public static func openQueue(name: String, flags: TunFlags) throws(SyscallError) -> Int32 {
        let fd = try openFile(devicePath, flags: O_RDWR | O_NONBLOCK)
        var f = flags.rawValue
        let rc = name.withCString { mqt_ifreq_ioctl_flags(fd, mqt_TUNSETIFF, $0, &f) }
        if rc == -1 {
            let err = Errno.current
            closeFD(fd)
            throw SyscallError(call: "ioctl(TUNSETIFF)", errno: err)
        }
        return fd
    }

    /// Detaches (`enabled == false`) or re-attaches a queue without closing it.
    public static func setQueue(_ fd: Int32, enabled: Bool) throws(SyscallError) {
        var f = enabled ? mqt_IFF_ATTACH_QUEUE : mqt_IFF_DETACH_QUEUE
        let call = enabled ? "ioctl(TUNSETQUEUE, IFF_ATTACH_QUEUE)" : "ioctl(TUNSETQUEUE, IFF_DETACH_QUEUE)"
        _ = try retryingEINTR(call) { mqt_ifreq_ioctl_flags(fd, mqt_TUNSETQUEUE, nil, &f) }
    }

    /// Sets or clears `IFF_PERSIST`: a persistent device outlives its last fd.
    public static func setPersist(_ fd: Int32, _ persist: Bool) throws(SyscallError) {
        _ = try retryingEINTR("ioctl(TUNSETPERSIST)") {
            mqt_ioctl_value(fd, mqt_TUNSETPERSIST, persist ? 1 : 0)
        }
    }

    /// Lets only `uid` (and processes with CAP_NET_ADMIN) attach queues to the device.
    public static func setOwner(_ fd: Int32, _ uid: UInt32) throws(SyscallError) {
        _ = try retryingEINTR("ioctl(TUNSETOWNER)") { mqt_ioctl_value(fd, mqt_TUNSETOWNER, UInt(uid)) }
    }

    /// Lets only members of `gid` (and processes with CAP_NET_ADMIN) attach queues; with an
    /// owner too, either suffices.
    public static func setGroup(_ fd: Int32, _ gid: UInt32) throws(SyscallError) {
        _ = try retryingEINTR("ioctl(TUNSETGROUP)") { mqt_ioctl_value(fd, mqt_TUNSETGROUP, UInt(gid)) }
    }

    /// The `IFF_*` flags this kernel's tun driver supports, asked on a fresh unbound fd.
    public static func features() throws(SyscallError) -> TunFlags {
        let fd = try openFile(devicePath, flags: O_RDWR)
        defer { closeFD(fd) }
        var f: UInt32 = 0
        _ = try retryingEINTR("ioctl(TUNGETFEATURES)") { mqt_ioctl(fd, mqt_TUNGETFEATURES, &f) }
        return TunFlags(rawValue: Int32(truncatingIfNeeded: f))
    }

    /// Sets the device's offloads (for every queue: it is the device's setting).
    public static func setOffload(_ fd: Int32, _ offloads: TunOffloads) throws(SyscallError) {
        _ = try retryingEINTR("ioctl(TUNSETOFFLOAD)") { mqt_ioctl_value(fd, mqt_TUNSETOFFLOAD, UInt(offloads.rawValue)) }
    }

    /// The vnet header size the device puts in front of every frame (device-wide: whoever
    /// holds a queue can change it).
    public static func vnetHeaderSize(_ fd: Int32) throws(SyscallError) -> Int {
        var v: Int32 = 0
        _ = try retryingEINTR("ioctl(TUNGETVNETHDRSZ)") { mqt_ioctl(fd, mqt_TUNGETVNETHDRSZ, &v) }
        return Int(v)
    }

    public static func setVnetHeaderSize(_ fd: Int32, _ size: Int) throws(SyscallError) {
        var v = Int32(size)
        _ = try retryingEINTR("ioctl(TUNSETVNETHDRSZ)") { mqt_ioctl(fd, mqt_TUNSETVNETHDRSZ, &v) }
    }

    /// The vnet header's byte order: little-endian forced (`TUNGETVNETLE`) and big-endian
    /// (`TUNGETVNETBE`); nil where this kernel has no such setting (EINVAL or ENOTTY: built
    /// without CONFIG_TUN_VNET_CROSS_LE, for BE).
    public static func vnetByteOrder(_ fd: Int32) throws(SyscallError) -> (littleEndian: Bool?, bigEndian: Bool?) {
        func get(_ request: UInt, _ call: String) throws(SyscallError) -> Bool? {
            var v: Int32 = 0
            do {
                _ = try retryingEINTR(call) { mqt_ioctl(fd, request, &v) }
            } catch where error.errno == .invalidArgument || error.errno == .notTTY {
                return nil
            }
            return v != 0
        }
        return (try get(mqt_TUNGETVNETLE, "ioctl(TUNGETVNETLE)"), try get(mqt_TUNGETVNETBE, "ioctl(TUNGETVNETBE)"))
    }

    public static func setVnetLittleEndian(_ fd: Int32, _ on: Bool) throws(SyscallError) {
        var v: Int32 = on ? 1 : 0
        _ = try retryingEINTR("ioctl(TUNSETVNETLE)") { mqt_ioctl(fd, mqt_TUNSETVNETLE, &v) }
    }

    public static func setVnetBigEndian(_ fd: Int32, _ on: Bool) throws(SyscallError) {
        var v: Int32 = on ? 1 : 0
        _ = try retryingEINTR("ioctl(TUNSETVNETBE)") { mqt_ioctl(fd, mqt_TUNSETVNETBE, &v) }
    }

    /// Takes away a steering and a filter eBPF program and the TX filter a holder may have
    /// set: the kernel then steers by its own hash and lets every frame through. Reading
    /// them back is not possible (no getter), so this is done whatever they are.
    public static func clearPrograms(_ fd: Int32, tap: Bool) throws(SyscallError) {
        var first: SyscallError?
        for (request, call) in [(mqt_TUNSETSTEERINGEBPF, "ioctl(TUNSETSTEERINGEBPF, -1)"),
                                (mqt_TUNSETFILTEREBPF, "ioctl(TUNSETFILTEREBPF, -1)")] {
            var none: Int32 = -1
            do {
                _ = try retryingEINTR(call) { mqt_ioctl(fd, request, &none) }
            } catch where error.errno == .invalidArgument || error.errno == .notTTY {
                // A kernel without eBPF programs for tun (before 4.16): nothing to take away.
            } catch {
                first = first ?? error
            }
        }
        // The TX filter is a TAP's (MAC addresses); TUN refuses it.
        if tap {
            do {
                _ = try retryingEINTR("ioctl(TUNSETTXFILTER, none)") { mqt_tun_clear_txfilter(fd) }
            } catch {
                first = first ?? error
            }
        }
        if let first { throw first }
    }

    /// Whether the queue is attached (false: detached with TUNSETQUEUE, by whoever holds the
    /// fd's open file, a lease holder included). TUNGETIFF on a detached queue's fd answers
    /// the flags with IFF_DETACH_QUEUE set.
    public static func isAttached(_ fd: Int32) throws(SyscallError) -> Bool {
        try getInterface(fd).flags.rawValue & mqt_IFF_DETACH_QUEUE == 0
    }

    /// The device name and flags a queue fd is bound to.
    /// The corresponding C call is `ioctl(TUNGETIFF)`.
    public static func getInterface(_ fd: Int32) throws(SyscallError) -> (name: String, flags: TunFlags) {
        var buf = [CChar](repeating: 0, count: Int(IFNAMSIZ))
        var flags: Int32 = 0
        _ = try retryingEINTR("ioctl(TUNGETIFF)") { mqt_tun_getiff(fd, &buf, &flags) }
        let name = buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return (name, TunFlags(rawValue: flags))
    }
}

/// A device's vnet header settings, as the kernel has them.
public struct VnetSettings: Hashable, Sendable {
    /// Bytes of vnet header in front of each frame (10, or 12 for virtio 1.0's).
    public var headerSize: Int
    /// TUNSETVNETLE / TUNSETVNETBE; nil where the kernel has no such setting.
    public var littleEndian: Bool?
    public var bigEndian: Bool?

    public init(headerSize: Int, littleEndian: Bool?, bigEndian: Bool?) {
        self.headerSize = headerSize
        self.littleEndian = littleEndian
        self.bigEndian = bigEndian
    }
}
