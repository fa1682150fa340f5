#if canImport(Glibc)
import Glibc
#endif
import CTunLinux
import TunKit

/// Sends Ethernet/IPv4/UDP frames out of an interface through an `AF_PACKET` socket, so the
/// kernel transmits them into a tap (and its queues, spread by flow hash).
public final class PacketSender {
    private let fd: Int32
    private var address: sockaddr_ll
    public let ifindex: Int32

    /// Binds to the interface; protocol 0 means the socket only sends (it would otherwise
    /// also receive every frame on the device, echoes included).
    public init(ifindex: Int) throws {
        self.ifindex = Int32(ifindex)
        fd = socket(AF_PACKET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SyscallError(call: "socket(AF_PACKET)", errno: Errno(errno)) }
        address = sockaddr_ll()
        address.sll_family = UInt16(AF_PACKET)
        address.sll_ifindex = Int32(ifindex)
        address.sll_halen = 6
    }

    deinit { Glibc.close(fd) }

    /// Builds one UDP frame of `size` bytes (≥ 42) for flow `flow` (it sets the source port).
    public static func frame(size: Int, flow: Int, dst: [UInt8], src: [UInt8] = [0x02, 0, 0, 0, 0, 0x01]) -> [UInt8] {
        precondition(size >= 42)
        var f = [UInt8](repeating: 0, count: size)
        f.replaceSubrange(0..<6, with: dst)
        f.replaceSubrange(6..<12, with: src)
        f[12] = 0x08; f[13] = 0x00
        // IPv4 header: 10.x addresses never leave the tap (no route, no address on it).
        let ipLen = size - 14
        f[14] = 0x45
        f[16] = UInt8(ipLen >> 8); f[17] = UInt8(ipLen & 0xff)
        f[22] = 64; f[23] = 17
        f[26] = 198; f[27] = 18; f[28] = 0; f[29] = 1       // 198.18.0.1 (benchmark range)
        f[30] = 198; f[31] = 18; f[32] = 1; f[33] = UInt8(flow & 0xff)
        var sum: UInt32 = 0
        for i in stride(from: 14, to: 34, by: 2) { sum += UInt32(f[i]) << 8 | UInt32(f[i + 1]) }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        let csum = ~UInt16(sum)
        f[24] = UInt8(csum >> 8); f[25] = UInt8(csum & 0xff)
        let sport = 10000 + (flow % 50000)
        f[34] = UInt8(sport >> 8); f[35] = UInt8(sport & 0xff)
        f[36] = 0x13; f[37] = 0x88                          // dport 5000
        let udpLen = size - 34
        f[38] = UInt8(udpLen >> 8); f[39] = UInt8(udpLen & 0xff)
        return f
    }

    /// Sends one frame; returns false if the kernel refused it (e.g. ENOBUFS), so the
    /// caller counts only frames the kernel took.
    @discardableResult
    public func send(_ frame: [UInt8]) -> Bool {
        var addr = address
        let n = frame.withUnsafeBytes { buf in
            withUnsafePointer(to: &addr) { ap in
                ap.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, buf.baseAddress, buf.count, 0, $0, socklen_t(MemoryLayout<sockaddr_ll>.size))
                }
            }
        }
        return n == frame.count
    }

    /// Sends `count` frames over `flows` flows; returns how many the kernel took.
    public func send(count: Int, flows: Int, size: Int = 60, dst: [UInt8]) -> Int {
        var sent = 0
        let frames = (0..<flows).map { PacketSender.frame(size: size, flow: $0, dst: dst) }
        for i in 0..<count where send(frames[i % flows]) { sent += 1 }
        return sent
    }
}
