import TunKit

/// The kernel operations the manager needs, as a seam: the real driver calls the syscall
/// layer; tests substitute a driver that injects `E2BIG`, `EBUSY`, `EMFILE`, … without root.
///
/// A driver has no policy and no state the manager relies on: it does what it is told.
public protocol TunDriver: Sendable {
    /// Opens one queue of `name` (creating the device on the first one) and returns its fd.
    /// The fd must be pollable; on failure nothing stays open.
    func openQueue(name: String, flags: TunFlags) throws(SyscallError) -> Int32
    /// The same, from inside the network namespace `netns` (an fd of it): the device is made,
    /// or found by name, there. nil: the daemon's own.
    func openQueue(name: String, flags: TunFlags, netns: Int32?) throws(SyscallError) -> Int32
    /// What has the name in the namespace `netns` (nil: the daemon's own).
    func interface(_ name: String, netns: Int32?) throws(SyscallError) -> InterfaceState
    func setQueue(_ fd: Int32, enabled: Bool) throws(SyscallError)
    func setPersist(_ fd: Int32, _ persist: Bool) throws(SyscallError)
    func close(_ fd: Int32)
    func setUp(_ name: String, _ up: Bool) throws(SyscallError)
    func setMTU(_ name: String, _ mtu: Int) throws(SyscallError)
    func setMAC(_ name: String, _ mac: [UInt8]) throws(SyscallError)
    func mac(_ name: String) throws(SyscallError) -> [UInt8]
    /// Whether the queue fd is still bound to a device. False once the device was deleted
    /// behind the daemon's back (the kernel then answers TUNGETIFF with EBADFD): how the
    /// manager tells, for attached and detached queues alike, without racing sysfs.
    func isBound(_ fd: Int32) -> Bool
    /// The interface called `name` as rtnetlink has it (MTU, flags, counters, and a tun
    /// device's owner, group and kernel queue counts); nil if there is none.
    func link(named name: String) throws(SyscallError) -> LinkInfo?
    /// The name the device of a queue fd has now (TUNGETIFF): after `ip link set … name`,
    /// the new one. What every by-name operation on a managed device uses.
    func boundName(_ fd: Int32) throws(SyscallError) -> String
    /// The network namespace the device of a queue fd is in now.
    func place(of fd: Int32) throws(SyscallError) -> Netns.Place
    /// Who may attach queues without CAP_NET_ADMIN (TUNSETOWNER, TUNSETGROUP).
    func setOwner(_ fd: Int32, _ uid: UInt32) throws(SyscallError)
    func setGroup(_ fd: Int32, _ gid: UInt32) throws(SyscallError)
    /// What has the name now: nothing, a tun/tap device (with its `tun_flags`), or another
    /// kind of interface.
    func interface(_ name: String) throws(SyscallError) -> InterfaceState
    /// The `IFF_*` flags the kernel's tun driver supports (`TUNGETFEATURES`).
    func features() throws(SyscallError) -> TunFlags
    /// Whether the queue is attached, as the kernel has it (another holder of the same open
    /// file may have changed it).
    func isAttached(_ fd: Int32) throws(SyscallError) -> Bool
    /// Deletes the link by index (RTM_DELLINK), whoever holds its queues.
    func deleteLink(ifindex: Int) throws(SyscallError)
    /// A second fd of the same open file (the same queue), close-on-exec, for handing over.
    func duplicate(_ fd: Int32) throws(SyscallError) -> OwnedFD
    /// Sets the device's offloads (TUNSETOFFLOAD) through one of its queue fds.
    func setOffload(_ fd: Int32, _ offloads: TunOffloads) throws(SyscallError)
    /// The device's vnet header size and byte order (device-wide: any holder of one of its
    /// queues can change them).
    func vnetSettings(_ fd: Int32) throws(SyscallError) -> VnetSettings
    func setVnetHeaderSize(_ fd: Int32, _ size: Int) throws(SyscallError)
    /// Sets the byte order flags that are not nil.
    func setVnetByteOrder(_ fd: Int32, littleEndian: Bool?, bigEndian: Bool?) throws(SyscallError)
    /// Takes away steering and filter eBPF programs, and on a TAP device the TX filter (no
    /// getter exists).
    func clearPrograms(_ fd: Int32, tap: Bool) throws(SyscallError)
    /// Runs `body` in the network namespace of the device `fd` (one of its queue fds) is in:
    /// names and ifindexes mean that namespace's interfaces there. nil if the device is in
    /// the daemon's own namespace (run `body` directly then).
    func inDeviceNamespace<T: Sendable>(_ fd: Int32, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T?
    /// Runs `body` in the namespace `netns` (an fd of it; nil: the daemon's own).
    func inNamespace<T: Sendable>(_ netns: Int32?, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T
    /// The interface with this index in the calling thread's namespace; nil if there is none.
    func link(ifindex: Int) throws(SyscallError) -> LinkInfo?
}

public enum InterfaceState: Equatable, Sendable {
    case absent
    case tun(TunFlags)
    case other
}

/// The driver for real devices: `/dev/net/tun`, `SIOC*` ioctls and sysfs.
public struct LinuxTunDriver: TunDriver {
    public init() {}

    public func openQueue(name: String, flags: TunFlags) throws(SyscallError) -> Int32 {
        try Tun.openQueue(name: name, flags: flags)
    }
    public func openQueue(name: String, flags: TunFlags, netns: Int32?) throws(SyscallError) -> Int32 {
        guard let netns else { return try Tun.openQueue(name: name, flags: flags) }
        return try Netns.run(in: netns) { () throws(SyscallError) -> Int32 in try Tun.openQueue(name: name, flags: flags) }
    }
    public func interface(_ name: String, netns: Int32?) throws(SyscallError) -> InterfaceState {
        guard let netns else { return try interface(name) }
        // sysfs shows the namespace of whoever mounted it: asked of rtnetlink, in the namespace.
        let link = try Netns.run(in: netns) { () throws(SyscallError) -> LinkInfo? in try Link.info(name: name) }
        guard let link else { return .absent }
        guard let tun = link.tun else { return .other }
        return .tun(tun.flags)
    }
    public func setQueue(_ fd: Int32, enabled: Bool) throws(SyscallError) {
        try Tun.setQueue(fd, enabled: enabled)
    }
    public func setPersist(_ fd: Int32, _ persist: Bool) throws(SyscallError) {
        try Tun.setPersist(fd, persist)
    }
    public func close(_ fd: Int32) { closeFD(fd) }
    public func setUp(_ name: String, _ up: Bool) throws(SyscallError) { try Link.setUp(name, up) }
    public func setMTU(_ name: String, _ mtu: Int) throws(SyscallError) { try Link.setMTU(name, mtu) }
    public func setMAC(_ name: String, _ mac: [UInt8]) throws(SyscallError) { try Link.setMAC(name, mac) }
    public func mac(_ name: String) throws(SyscallError) -> [UInt8] { try Link.mac(name) }
    public func isBound(_ fd: Int32) -> Bool {
        do {
            _ = try Tun.getInterface(fd)
            return true
        } catch {
            return error.errno != .badFileDescriptorState
        }
    }
    public func link(named name: String) throws(SyscallError) -> LinkInfo? { try Link.info(name: name) }
    public func boundName(_ fd: Int32) throws(SyscallError) -> String { try Tun.getInterface(fd).name }
    public func place(of fd: Int32) throws(SyscallError) -> Netns.Place { try Netns.place(ofDevice: fd) }
    public func setOwner(_ fd: Int32, _ uid: UInt32) throws(SyscallError) { try Tun.setOwner(fd, uid) }
    public func setGroup(_ fd: Int32, _ gid: UInt32) throws(SyscallError) { try Tun.setGroup(fd, gid) }
    public func interface(_ name: String) throws(SyscallError) -> InterfaceState {
        guard try Link.sysfsIfindex(name) != nil else { return .absent }
        guard let flags = try Link.tunFlags(name) else { return .other }
        return .tun(flags)
    }
    public func features() throws(SyscallError) -> TunFlags { try Tun.features() }
    public func isAttached(_ fd: Int32) throws(SyscallError) -> Bool { try Tun.isAttached(fd) }
    public func deleteLink(ifindex: Int) throws(SyscallError) { try Link.delete(ifindex: ifindex) }
    public func duplicate(_ fd: Int32) throws(SyscallError) -> OwnedFD { try OwnedFD(duplicating: fd) }
    public func setOffload(_ fd: Int32, _ offloads: TunOffloads) throws(SyscallError) { try Tun.setOffload(fd, offloads) }
    public func vnetSettings(_ fd: Int32) throws(SyscallError) -> VnetSettings {
        let order = try Tun.vnetByteOrder(fd)
        return VnetSettings(headerSize: try Tun.vnetHeaderSize(fd), littleEndian: order.littleEndian, bigEndian: order.bigEndian)
    }
    public func setVnetHeaderSize(_ fd: Int32, _ size: Int) throws(SyscallError) { try Tun.setVnetHeaderSize(fd, size) }
    public func setVnetByteOrder(_ fd: Int32, littleEndian: Bool?, bigEndian: Bool?) throws(SyscallError) {
        if let le = littleEndian { try Tun.setVnetLittleEndian(fd, le) }
        if let be = bigEndian { try Tun.setVnetBigEndian(fd, be) }
    }
    public func clearPrograms(_ fd: Int32, tap: Bool) throws(SyscallError) {
        try Tun.clearPrograms(fd, tap: tap)
    }
    public func inNamespace<T: Sendable>(_ netns: Int32?, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        guard let netns else { return try body() }
        return try Netns.run(in: netns, body)
    }
    public func link(ifindex: Int) throws(SyscallError) -> LinkInfo? { try Link.info(ifindex: ifindex) }
    public func inDeviceNamespace<T: Sendable>(_ fd: Int32, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T? {
        // Before Linux 5.2 there is no TUNGETDEVNETNS (ENOTTY): no device can be elsewhere
        // as far as the daemon can tell, so here.
        guard let ns = try Netns.ofDeviceIfSupported(fd), try Netns.inode(ns.fd) != Netns.currentInode() else { return nil }
        return try Netns.run(in: ns.fd, body)
    }
}
