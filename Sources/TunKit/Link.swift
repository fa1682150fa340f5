#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// Interface settings that go through an `AF_INET` datagram socket (`SIOC*` ioctls),
/// and what sysfs says about an interface.
public enum Link {
    /// Runs `body` with a fresh control socket: one per call keeps this thread-safe and the
    /// socket's life obvious; it costs one socket(2) on the control path only.
    private static func withControlSocket<T>(_ body: (Int32) throws(SyscallError) -> T) throws(SyscallError) -> T {
        let s = try retryingEINTR("socket(AF_INET, SOCK_DGRAM)") {
            socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        defer { closeFD(s) }
        return try body(s)
    }

    /// Brings the interface up or down.
    public static func setUp(_ name: String, _ up: Bool) throws(SyscallError) {
        try withControlSocket { (s) throws(SyscallError) in
            var flags: Int32 = 0
            _ = try retryingEINTR("ioctl(SIOCGIFFLAGS)") {
                name.withCString { mqt_ifreq_ioctl_flags(s, mqt_SIOCGIFFLAGS, $0, &flags) }
            }
            flags = up ? (flags | mqt_IFF_UP) : (flags & ~mqt_IFF_UP)
            _ = try retryingEINTR("ioctl(SIOCSIFFLAGS)") {
                name.withCString { mqt_ifreq_ioctl_flags(s, mqt_SIOCSIFFLAGS, $0, &flags) }
            }
        }
    }

    /// Whether the interface is administratively up.
    public static func isUp(_ name: String) throws(SyscallError) -> Bool {
        try withControlSocket { (s) throws(SyscallError) in
            var flags: Int32 = 0
            _ = try retryingEINTR("ioctl(SIOCGIFFLAGS)") {
                name.withCString { mqt_ifreq_ioctl_flags(s, mqt_SIOCGIFFLAGS, $0, &flags) }
            }
            return flags & mqt_IFF_UP != 0
        }
    }

    public static func setMTU(_ name: String, _ mtu: Int) throws(SyscallError) {
        try withControlSocket { (s) throws(SyscallError) in
            var v = Int32(mtu)
            _ = try retryingEINTR("ioctl(SIOCSIFMTU)") {
                name.withCString { mqt_ifreq_ioctl_int(s, mqt_SIOCSIFMTU, $0, &v, 0) }
            }
        }
    }

    public static func mtu(_ name: String) throws(SyscallError) -> Int {
        try withControlSocket { (s) throws(SyscallError) in
            var v: Int32 = 0
            _ = try retryingEINTR("ioctl(SIOCGIFMTU)") {
                name.withCString { mqt_ifreq_ioctl_int(s, mqt_SIOCGIFMTU, $0, &v, 0) }
            }
            return Int(v)
        }
    }

    public static func setMAC(_ name: String, _ mac: [UInt8]) throws(SyscallError) {
        precondition(mac.count == 6, "a MAC address has 6 bytes")
        try withControlSocket { (s) throws(SyscallError) in
            _ = try retryingEINTR("ioctl(SIOCSIFHWADDR)") {
                name.withCString { n in mac.withUnsafeBufferPointer { mqt_ifreq_set_hwaddr(s, n, $0.baseAddress) } }
            }
        }
    }

    public static func mac(_ name: String) throws(SyscallError) -> [UInt8] {
        try withControlSocket { (s) throws(SyscallError) in
            var mac = [UInt8](repeating: 0, count: 6)
            _ = try retryingEINTR("ioctl(SIOCGIFHWADDR)") {
                name.withCString { n in mac.withUnsafeMutableBufferPointer { mqt_ifreq_get_hwaddr(s, n, $0.baseAddress) } }
            }
            return mac
        }
    }

    public static func ifindex(_ name: String) throws(SyscallError) -> Int {
        try withControlSocket { (s) throws(SyscallError) in
            var v: Int32 = 0
            _ = try retryingEINTR("ioctl(SIOCGIFINDEX)") {
                name.withCString { mqt_ifreq_ioctl_int(s, mqt_SIOCGIFINDEX, $0, &v, 1) }
            }
            return Int(v)
        }
    }

    // MARK: sysfs

    private static func sysfs(_ name: String, _ leaf: String) -> String {
        "/sys/class/net/\(name)/\(leaf)"
    }

    /// The interface's ifindex from sysfs, nil if no interface has that name.
    public static func sysfsIfindex(_ name: String) throws(SyscallError) -> Int? {
        guard let text = try readSmallFile(sysfs(name, "ifindex")) else { return nil }
        return Int(text.trimmingWhitespace)
    }

    /// `/sys/class/net/<name>/tun_flags` (e.g. `0x1102`); nil if the interface is gone or
    /// is not a tun/tap device.
    public static func tunFlags(_ name: String) throws(SyscallError) -> TunFlags? {
        guard let text = try readSmallFile(sysfs(name, "tun_flags")) else { return nil }
        let t = text.trimmingWhitespace
        let hex = t.hasPrefix("0x") ? String(t.dropFirst(2)) : t
        return Int32(hex, radix: 16).map(TunFlags.init(rawValue:))
    }

    /// The interface as rtnetlink has it (one `RTM_GETLINK`), by index, or by name when
    /// `ifindex` is nil; in the calling thread's namespace. nil if there is no such interface.
    public static func info(ifindex: Int? = nil, name: String? = nil) throws(SyscallError) -> LinkInfo? {
        precondition(ifindex != nil || name != nil, "a link is asked for by index or by name")
        var li = mqt_link_info()
        let rc = (name ?? "").withCString { mqt_link_info_get(Int32(ifindex ?? 0), $0, &li) }
        if rc == -ENODEV { return nil }
        if rc < 0 { throw SyscallError(call: "RTM_GETLINK(\(ifindex.map(String.init) ?? name ?? ""))", errno: Errno(-rc)) }
        let st = li.stats
        let linkName = withUnsafeBytes(of: li.name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        var tun: LinkInfo.Tun?
        if li.is_tun != 0 {
            tun = LinkInfo.Tun(persist: li.tun_persist != 0, attachedQueues: Int(li.tun_queues), detachedQueues: Int(li.tun_disabled_queues),
                               owner: li.has_tun_owner == 0 ? nil : li.tun_owner, group: li.has_tun_group == 0 ? nil : li.tun_group)
            // tun_flags as sysfs shows them, from the driver's attributes (sysfs shows the
            // namespace of whoever mounted it, so a device elsewhere is read this way).
            var f = TunFlags(rawValue: li.tun_type == 1 ? mqt_IFF_TUN : mqt_IFF_TAP)
            if li.tun_pi == 0 { f.insert(.noPI) }
            if li.tun_vnet_hdr != 0 { f.insert(.vnetHdr) }
            if li.tun_multi_queue != 0 { f.insert(.multiQueue) }
            if li.tun_persist != 0 { f.insert(.persist) }
            tun?.flags = f
            if li.tun_multi_queue == 0 {
                // The kernel counts queues only for a multiqueue device. A one-queue device has
                // its carrier on exactly while a file is attached (tun_attach / tun_detach),
                // up or down (IFLA_CARRIER; IFF_LOWER_UP shows only while it is up).
                tun?.attachedQueues = li.carrier != 0 ? 1 : 0
                tun?.detachedQueues = 0
            }
        }
        return LinkInfo(
            ifindex: Int(li.ifindex), name: linkName, mtu: Int(li.mtu), up: Int32(bitPattern: li.flags) & mqt_IFF_UP != 0,
            statistics: li.has_stats == 0 ? nil : [
                "rx_packets": st.rx_packets, "rx_bytes": st.rx_bytes, "rx_errors": st.rx_errors, "rx_dropped": st.rx_dropped,
                "tx_packets": st.tx_packets, "tx_bytes": st.tx_bytes, "tx_errors": st.tx_errors, "tx_dropped": st.tx_dropped,
            ],
            tun: tun)
    }

    /// Deletes the link with this index (`ip link del`, by index: never whatever took the
    /// name). The corresponding C function is `mqt_link_delete` (RTM_DELLINK).
    public static func delete(ifindex: Int) throws(SyscallError) {
        let rc = mqt_link_delete(Int32(ifindex))
        if rc < 0 { throw SyscallError(call: "RTM_DELLINK(\(ifindex))", errno: Errno(-rc)) }
    }

    /// The counters of `/sys/class/net/<dev>/statistics` the daemon reports.
    public static let statisticsKeys = [
        "rx_packets", "rx_bytes", "rx_errors", "rx_dropped",
        "tx_packets", "tx_bytes", "tx_errors", "tx_dropped",
    ]

    /// Writes `/proc/sys/net/ipv6/conf/<name>/disable_ipv6` (so the kernel sends no router
    /// solicitations or MLD reports of its own on the device).
    public static func setIPv6Disabled(_ name: String, _ disabled: Bool) throws(SyscallError) {
        try writeSmallFile("/proc/sys/net/ipv6/conf/\(name)/disable_ipv6", disabled ? "1" : "0")
    }
}

/// One interface as rtnetlink answered for it.
public struct LinkInfo: Hashable, Sendable {
    /// What a tun/tap device's driver reports about it.
    public struct Tun: Hashable, Sendable {
        public var persist: Bool
        /// Queues attached, and detached (TUNSETQUEUE), whoever holds their fds.
        public var attachedQueues: Int
        public var detachedQueues: Int
        /// Who may attach queues (TUNSETOWNER/TUNSETGROUP); nil: no one set.
        public var owner: UInt32?
        public var group: UInt32?
        /// The device's `tun_flags` (type, PI, vnet header, multiqueue, persistence).
        public var flags: TunFlags = []

        public init(persist: Bool, attachedQueues: Int, detachedQueues: Int, owner: UInt32? = nil, group: UInt32? = nil) {
            self.persist = persist
            self.attachedQueues = attachedQueues
            self.detachedQueues = detachedQueues
            self.owner = owner
            self.group = group
        }

        public var queues: Int { attachedQueues + detachedQueues }
    }

    public var ifindex: Int
    public var name: String
    public var mtu: Int
    public var up: Bool
    /// The counters `Link.statisticsKeys` names (IFLA_STATS64).
    public var statistics: [String: UInt64]?
    /// nil: not a tun/tap device.
    public var tun: Tun?

    public init(ifindex: Int, name: String, mtu: Int, up: Bool, statistics: [String: UInt64]?, tun: Tun?) {
        self.ifindex = ifindex
        self.name = name
        self.mtu = mtu
        self.up = up
        self.statistics = statistics
        self.tun = tun
    }
}
