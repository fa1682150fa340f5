#if canImport(Glibc)
import Glibc
#endif
import TunKit

/// A connected stream socket for a client (the `mqtap` CLI): Unix or TCP, with a timeout.
public final class ClientSocket {
    public let fd: Int32

    private init(fd: Int32) { self.fd = fd }

    deinit { closeFD(fd) }

    static func unix(_ path: String, timeoutSeconds: Int = 30) throws(SyscallError) -> ClientSocket {
        try connect(SocketAddress.unix(path), "connect(\(path))", timeoutSeconds)
    }

    /// `host` is an IPv4 or IPv6 literal, or `localhost`.
    static func tcp(host: String, port: Int, timeoutSeconds: Int = 30) throws(SyscallError) -> ClientSocket {
        try connect(SocketAddress.inet(host: host, port: port), "connect(\(host):\(port))", timeoutSeconds)
    }

    private static func connect(_ address: SocketAddress, _ call: String, _ timeout: Int) throws(SyscallError) -> ClientSocket {
        let s = ClientSocket(fd: try address.socket(SOCK_STREAM))
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        _ = setsockopt(s.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(s.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = try retryingEINTR(call) { address.withSockaddr { Glibc.connect(s.fd, $0, $1) } }
        return s
    }

    func sendAll(_ bytes: [UInt8]) throws(SyscallError) {
        var offset = 0
        while offset < bytes.count {
            let n = try retryingEINTR("send") {
                bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            }
            offset += n
        }
    }

    /// Reads what has arrived (at most `max` bytes), waiting up to the timeout; empty at end
    /// of file.
    func receive(max: Int = 65536) throws(SyscallError) -> [UInt8] {
        var chunk = [UInt8](repeating: 0, count: max)
        let n = try retryingEINTR("recv") { chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) } }
        return Array(chunk[0..<n])
    }

    /// Reads until the peer closes.
    func readAll() throws(SyscallError) -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = try retryingEINTR("recv") { chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) } }
            if n == 0 { return out }
            out.append(contentsOf: chunk[0..<n])
        }
    }
}
