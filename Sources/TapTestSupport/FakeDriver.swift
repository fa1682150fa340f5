#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import TapCore
import TunKit

/// A driver with no kernel behind it: each "queue" is one end of a SOCK_SEQPACKET pair,
/// so workers poll and read real fds and a test can write frames into a queue from the
/// other end. Failures are injected per operation, so error paths run without root.
public final class FakeDriver: TunDriver, Sendable {
    /// `features`: what TUNGETFEATURES answers (default: everything the daemon uses).
    public init(features: TunFlags = [.tun, .tap, .noPI, .vnetHdr, .multiQueue, .exclusive, .persist]) {
        state.withLock { $0.features = features }
    }

    public enum Op: Hashable, Sendable {
        case openQueue, setQueue, setPersist, setUp, setMTU, setMAC, link
    }

    public struct Device: Sendable {
        public var fds: [Int32] = []
        public var detached: Set<Int32> = []
        public var persist = false
        public var up = false
        public var mtu = 1500
        public var mac: [UInt8] = [0x02, 0xfa, 0x4e, 0, 0, 1]
        public var ifindex: Int
        public var flags: TunFlags
        /// Another process (a lease holder) has fds of it: it outlives the daemon's.
        public var heldElsewhere = false
        public var offloads: TunOffloads = []
        public var owner: UInt32?
        public var group: UInt32?
        /// Queues other processes attached (by name, as QEMU with `ifname=` does).
        public var foreignQueues = 0
        public var vnet = VnetSettings(headerSize: 10, littleEndian: false, bigEndian: false)
        /// Times the daemon took away eBPF programs and the TX filter.
        public var programsCleared = 0
    }

    struct State: Sendable {
        var devices: [String: Device] = [:]
        /// Names that exist but are not ours (like `lo`).
        var foreign: Set<String> = ["lo"]
        /// Queue fd → the test's end of its pair.
        var peers: [Int32: Int32] = [:]
        /// Queue fd → device name, for every fd handed out.
        var owner: [Int32: String] = [:]
        /// Planned failures: the n-th next call of an op (0 = the very next) fails.
        var failures: [Op: [(after: Int, errno: Errno)]] = [:]
        var calls: [Op: Int] = [:]
        var nextIfindex = 100
        /// Devices "deleted behind the back": their fds report EBADFD on TUNGETIFF.
        var vanished: Set<Int32> = []
        var features: TunFlags = []
        var statisticsError: Errno?
        var inspectError: Errno?
    }

    let state = Mutex(State())

    /// Makes the `after`-th next call of `op` fail with `errno`.
    public func fail(_ op: Op, with errno: Errno, after: Int = 0) {
        state.withLock { s in
            let base = s.calls[op, default: 0]
            s.failures[op, default: []].append((base + after, errno))
        }
    }

    public func calls(_ op: Op) -> Int { state.withLock { $0.calls[op, default: 0] } }
    public func device(_ name: String) -> Device? { state.withLock { $0.devices[name] } }
    public var openFDs: Int { state.withLock { $0.owner.count } }

    /// The test's end of a queue's pair, to write frames into the queue or read echoes.
    public func peer(of fd: Int32) -> Int32? { state.withLock { $0.peers[fd] } }
    public func fds(of name: String) -> [Int32] { state.withLock { $0.devices[name]?.fds ?? [] } }

    /// Simulates `ip link del`: the device disappears, its queue fds hang up.
    public func vanish(_ name: String) {
        state.withLock { s in
            guard let d = s.devices.removeValue(forKey: name) else { return }
            for fd in d.fds {
                s.vanished.insert(fd)
                if let p = s.peers.removeValue(forKey: fd) { Glibc.close(p) }
            }
        }
    }

    private func check(_ op: Op, _ s: inout State, call: String) throws(SyscallError) {
        let n = s.calls[op, default: 0]
        s.calls[op] = n + 1
        if let i = s.failures[op]?.firstIndex(where: { $0.after == n }) {
            let e = s.failures[op]!.remove(at: i).errno
            throw SyscallError(call: call, errno: e)
        }
    }

    public func openQueue(name: String, flags: TunFlags) throws(SyscallError) -> Int32 {
        try state.withLock { (s) throws(SyscallError) -> Int32 in
            try check(.openQueue, &s, call: "open(/dev/net/tun)")
            if s.foreign.contains(name) || (flags.contains(.exclusive) && s.devices[name] != nil) {
                throw SyscallError(call: "ioctl(TUNSETIFF)", errno: .busy)
            }
            if let d = s.devices[name], d.fds.count >= Tun.kernelMaxQueues {
                throw SyscallError(call: "ioctl(TUNSETIFF)", errno: .tooBig)
            }
            var pair: [Int32] = [0, 0]
            guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &pair) == 0 else {
                throw SyscallError(call: "socketpair", errno: Errno(errno))
            }
            if s.devices[name] == nil {
                s.devices[name] = Device(ifindex: s.nextIfindex, flags: flags.subtracting(.exclusive))
                s.nextIfindex += 1
            }
            s.devices[name]!.fds.append(pair[0])
            s.peers[pair[0]] = pair[1]
            s.owner[pair[0]] = name
            return pair[0]
        }
    }


    public func setQueue(_ fd: Int32, enabled: Bool) throws(SyscallError) {
        try state.withLock { (s) throws(SyscallError) in
            try check(.setQueue, &s, call: "ioctl(TUNSETQUEUE)")
            guard let name = s.owner[fd], s.devices[name] != nil else {
                throw SyscallError(call: "ioctl(TUNSETQUEUE)", errno: .badFileDescriptorState)
            }
            // As the kernel: asking for the state a queue already has is EINVAL.
            guard s.devices[name]!.detached.contains(fd) == enabled else {
                throw SyscallError(call: "ioctl(TUNSETQUEUE)", errno: .invalidArgument)
            }
            if enabled { s.devices[name]!.detached.remove(fd) } else { s.devices[name]!.detached.insert(fd) }
        }
    }

    public func setPersist(_ fd: Int32, _ persist: Bool) throws(SyscallError) {
        try state.withLock { (s) throws(SyscallError) in
            try check(.setPersist, &s, call: "ioctl(TUNSETPERSIST)")
            if let name = s.owner[fd] { s.devices[name]?.persist = persist }
        }
    }

    public func close(_ fd: Int32) {
        state.withLock { s in
            guard let name = s.owner.removeValue(forKey: fd) else {
                preconditionFailure("close of an fd the fake never handed out: \(fd)")
            }
            Glibc.close(fd)
            if let p = s.peers.removeValue(forKey: fd) { Glibc.close(p) }
            s.vanished.remove(fd)
            guard var d = s.devices[name] else { return }
            d.fds.removeAll { $0 == fd }
            d.detached.remove(fd)
            s.devices[name] = d.fds.isEmpty && !d.persist && !d.heldElsewhere ? nil : d
        }
    }

    private func withDevice<T>(_ name: String, _ op: Op, _ call: String,
                               _ body: (inout Device) -> T) throws(SyscallError) -> T {
        try state.withLock { (s) throws(SyscallError) -> T in
            try check(op, &s, call: call)
            guard s.devices[name] != nil else { throw SyscallError(call: call, errno: .noDevice) }
            return body(&s.devices[name]!)
        }
    }

    /// A getter: no failure injection, only "no such device".
    private func read<T>(_ name: String, _ call: String, _ field: (Device) -> T) throws(SyscallError) -> T {
        try state.withLock { (s) throws(SyscallError) -> T in
            guard let d = s.devices[name] else { throw SyscallError(call: call, errno: .noDevice) }
            return field(d)
        }
    }

    public func setUp(_ name: String, _ up: Bool) throws(SyscallError) {
        try withDevice(name, .setUp, "ioctl(SIOCSIFFLAGS)") { $0.up = up }
    }
    public func setMTU(_ name: String, _ mtu: Int) throws(SyscallError) {
        try withDevice(name, .setMTU, "ioctl(SIOCSIFMTU)") { $0.mtu = mtu }
    }
    public func setMAC(_ name: String, _ mac: [UInt8]) throws(SyscallError) {
        try withDevice(name, .setMAC, "ioctl(SIOCSIFHWADDR)") { $0.mac = mac }
    }
    public func mac(_ name: String) throws(SyscallError) -> [UInt8] {
        try read(name, "ioctl(SIOCGIFHWADDR)") { $0.mac }
    }
    public func isBound(_ fd: Int32) -> Bool {
        state.withLock { !$0.vanished.contains(fd) && $0.owner[fd] != nil }
    }
    public func interface(_ name: String) throws(SyscallError) -> InterfaceState {
        try state.withLock { (s) throws(SyscallError) -> InterfaceState in
            if let e = s.inspectError { throw SyscallError(call: "open(/sys/class/net/\(name)/ifindex)", errno: e) }
            if s.foreign.contains(name) { return .other }
            guard let d = s.devices[name] else { return .absent }
            return .tun(d.persist ? d.flags.union(.persist) : d.flags)
        }
    }

    /// Makes `name` a tun device that exists without any fd (as a persistent device does
    /// after its daemon died), with the given flags.
    public func leavePersistent(_ name: String, flags: TunFlags) {
        state.withLock { s in
            s.devices[name] = Device(persist: true, ifindex: s.nextIfindex, flags: flags)
            s.nextIfindex += 1
        }
    }

    /// Marks `name` as held by another process too (a lease holder's fds): it stays when the
    /// daemon's fds close.
    public func holdElsewhere(_ name: String) {
        state.withLock { $0.devices[name]?.heldElsewhere = true }
    }

    public func addForeign(_ name: String) {
        state.withLock { _ = $0.foreign.insert(name) }
    }

    public func link(named name: String) throws(SyscallError) -> LinkInfo? {
        try state.withLock { (s) throws(SyscallError) -> LinkInfo? in
            if let e = s.statisticsError { throw SyscallError(call: "RTM_GETLINK(\(name))", errno: e) }
            try check(.link, &s, call: "RTM_GETLINK(\(name))")
            guard let d = s.devices[name] else { return nil }
            return LinkInfo(ifindex: d.ifindex, name: name, mtu: d.mtu, up: d.up, statistics: [:],
                            tun: LinkInfo.Tun(persist: d.persist,
                                              attachedQueues: d.fds.count - d.detached.count + d.foreignQueues,
                                              detachedQueues: d.detached.count, owner: d.owner, group: d.group))
        }
    }

    public func boundName(_ fd: Int32) throws(SyscallError) -> String {
        try state.withLock { (s) throws(SyscallError) -> String in
            guard !s.vanished.contains(fd), let name = s.owner[fd], s.devices[name] != nil else {
                throw SyscallError(call: "ioctl(TUNGETIFF)", errno: .badFileDescriptorState)
            }
            return name
        }
    }

    /// The fake has one namespace.
    public func place(of fd: Int32) throws(SyscallError) -> Netns.Place { Netns.Place(inode: 1, name: nil, isOwn: true) }

    public func setOwner(_ fd: Int32, _ uid: UInt32) throws(SyscallError) {
        state.withLock { s in if let name = s.owner[fd] { s.devices[name]?.owner = uid } }
    }

    public func setGroup(_ fd: Int32, _ gid: UInt32) throws(SyscallError) {
        state.withLock { s in if let name = s.owner[fd] { s.devices[name]?.group = gid } }
    }

    /// Renames a device, as `ip link set … name` does: its fds stay bound to it.
    public func rename(_ name: String, to new: String) {
        state.withLock { s in
            guard let d = s.devices.removeValue(forKey: name) else { return }
            s.devices[new] = d
            for fd in d.fds { s.owner[fd] = new }
        }
    }

    /// Another process attaches (or detaches, negative) queues to `name`.
    public func attachForeign(_ name: String, _ count: Int) {
        state.withLock { $0.devices[name]?.foreignQueues += count }
    }

    /// The fake has one namespace: every device is in the daemon's.
    public func inNamespace<T: Sendable>(_ netns: Int32?, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T { try body() }
    public func link(ifindex: Int) throws(SyscallError) -> LinkInfo? {
        let name = state.withLock { s in s.devices.first { $0.value.ifindex == ifindex }?.key }
        guard let name else { return nil }
        return try link(named: name)
    }

    /// The fake has one namespace: every device is in the daemon's.
    public func openQueue(name: String, flags: TunFlags, netns: Int32?) throws(SyscallError) -> Int32 {
        try openQueue(name: name, flags: flags)
    }
    public func interface(_ name: String, netns: Int32?) throws(SyscallError) -> InterfaceState { try interface(name) }

    public func features() throws(SyscallError) -> TunFlags {
        state.withLock { $0.features }
    }

    public func isAttached(_ fd: Int32) throws(SyscallError) -> Bool {
        try state.withLock { (s) throws(SyscallError) -> Bool in
            guard let name = s.owner[fd], let d = s.devices[name] else {
                throw SyscallError(call: "ioctl(TUNGETIFF)", errno: .badFileDescriptorState)
            }
            return !d.detached.contains(fd)
        }
    }

    public func deleteLink(ifindex: Int) throws(SyscallError) {
        let name = state.withLock { s in s.devices.first { $0.value.ifindex == ifindex }?.key }
        guard let name else { throw SyscallError(call: "RTM_DELLINK(\(ifindex))", errno: .noDevice) }
        vanish(name)
    }

    public func duplicate(_ fd: Int32) throws(SyscallError) -> OwnedFD { try OwnedFD(duplicating: fd) }

    /// The fake has one namespace: every device is in the daemon's.
    public func inDeviceNamespace<T: Sendable>(_ fd: Int32, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T? { nil }

    public func vnetSettings(_ fd: Int32) throws(SyscallError) -> VnetSettings {
        try onDevice(fd, "ioctl(TUNGETVNETHDRSZ)") { $0.vnet }
    }
    public func setVnetHeaderSize(_ fd: Int32, _ size: Int) throws(SyscallError) {
        try onDevice(fd, "ioctl(TUNSETVNETHDRSZ)") { $0.vnet.headerSize = size }
    }
    public func setVnetByteOrder(_ fd: Int32, littleEndian: Bool?, bigEndian: Bool?) throws(SyscallError) {
        try onDevice(fd, "ioctl(TUNSETVNETLE)") { d in
            if let le = littleEndian { d.vnet.littleEndian = le }
            if let be = bigEndian { d.vnet.bigEndian = be }
        }
    }
    public func clearPrograms(_ fd: Int32, tap: Bool) throws(SyscallError) {
        try onDevice(fd, "ioctl(TUNSETSTEERINGEBPF)") { $0.programsCleared += 1 }
    }
    /// What a holder does through its fd: changes the device-wide vnet header settings.
    public func holderSets(_ name: String, vnet: VnetSettings) {
        state.withLock { $0.devices[name]?.vnet = vnet }
    }
    /// What a holder does through its fd: TUNSETOWNER / TUNSETGROUP.
    public func holderSets(_ name: String, owner: UInt32?, group: UInt32?) {
        state.withLock { s in
            s.devices[name]?.owner = owner
            s.devices[name]?.group = group
        }
    }

    /// Runs `body` on the device `fd` is bound to; EBADFD once it is gone.
    private func onDevice<T>(_ fd: Int32, _ call: String, _ body: (inout Device) -> T) throws(SyscallError) -> T {
        let r: T? = state.withLock { s in
            guard let name = s.owner[fd], !s.vanished.contains(fd), s.devices[name] != nil else { return nil }
            return body(&s.devices[name]!)
        }
        guard let r else { throw SyscallError(call: call, errno: .badFileDescriptorState) }
        return r
    }

    /// Offloads set per device; USO is refused (EINVAL), as on kernels before 6.2.
    public func setOffload(_ fd: Int32, _ offloads: TunOffloads) throws(SyscallError) {
        try state.withLock { (s) throws(SyscallError) in
            guard let name = s.owner[fd], s.devices[name] != nil else {
                throw SyscallError(call: "ioctl(TUNSETOFFLOAD)", errno: .badFileDescriptorState)
            }
            guard s.devices[name]!.flags.contains(.vnetHdr) else {
                throw SyscallError(call: "ioctl(TUNSETOFFLOAD)", errno: .invalidArgument)
            }
            if !offloads.isDisjoint(with: [.uso4, .uso6]) {
                throw SyscallError(call: "ioctl(TUNSETOFFLOAD)", errno: .invalidArgument)
            }
            s.devices[name]!.offloads = offloads
        }
    }

    /// Makes every statistics read fail with `errno` (nil: succeed again).
    public func failStatistics(_ errno: Errno?) { state.withLock { $0.statisticsError = errno } }
    /// Makes every look at an interface's name fail with `errno` (nil: succeed again).
    public func failInspect(_ errno: Errno?) { state.withLock { $0.inspectError = errno } }
}

/// Writes one frame into a queue from the test's end of the pair.
@discardableResult
public func inject(_ peer: Int32, _ bytes: [UInt8]) -> Bool {
    bytes.withUnsafeBytes { Glibc.write(peer, $0.baseAddress, $0.count) } == bytes.count
}

/// Reads one frame that a worker wrote back into a queue (echo), if any is waiting.
public func receive(_ peer: Int32) -> [UInt8]? {
    var buf = [UInt8](repeating: 0, count: 2048)
    let n = buf.withUnsafeMutableBytes { Glibc.read(peer, $0.baseAddress, $0.count) }
    return n > 0 ? Array(buf[0..<n]) : nil
}
