#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// The two systemd protocols the daemon speaks, without libsystemd: socket activation
/// (`LISTEN_FDS`) and readiness notification (`NOTIFY_SOCKET`).
public enum Systemd {
    /// The listening sockets systemd passed (fds 3, 4, … when `LISTEN_PID` is this process),
    /// made close-on-exec and non-blocking. The variables are removed so a child never
    /// takes them for its own.
    public static func listenFDs() -> [Int32] {
        defer {
            unsetenv("LISTEN_PID")
            unsetenv("LISTEN_FDS")
            unsetenv("LISTEN_FDNAMES")
        }
        guard let pid = getenv("LISTEN_PID").flatMap({ Int32(String(cString: $0)) }), pid == getpid(),
              let n = getenv("LISTEN_FDS").flatMap({ Int32(String(cString: $0)) }), n > 0 else { return [] }
        return (0..<n).map { i in
            let fd = 3 + i
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            return fd
        }
    }

    /// The path a Unix listening socket is bound to, nil for another kind of socket.
    public static func unixPath(of fd: Int32) -> String? {
        var addr = sockaddr_un()
        var len = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard rc == 0, addr.sun_family == sa_family_t(AF_UNIX) else { return nil }
        return withUnsafeBytes(of: &addr.sun_path) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// Sends `state` ("READY=1", "STOPPING=1", …) to the service manager if it asked for it
    /// (`NOTIFY_SOCKET`, a path or an abstract `@name`). Returns whether it was sent.
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        guard let raw = getenv("NOTIFY_SOCKET") else { return false }
        let path = String(cString: raw)
        guard !path.isEmpty, path.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { closeFD(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }  // abstract namespace
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        let len = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let message = Array(state.utf8)
        let n = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                message.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, 0, sa, len) }
            }
        }
        return n == message.count
    }
}

/// A connected stream socket for a client (the `mqtap` CLI): Unix or TCP, with a timeout.
public final class ClientSocket {
    public let fd: Int32

    private init(fd: Int32) { self.fd = fd }

    deinit { closeFD(fd) }

    public static func unix(_ path: String, timeoutSeconds: Int = 30) throws(SyscallError) -> ClientSocket {
        let fd = try retryingEINTR("socket(AF_UNIX)") {
            socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        let s = ClientSocket(fd: fd)
        s.setTimeout(timeoutSeconds)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw SyscallError(call: "connect(\(path))", errno: Errno(ENAMETOOLONG))
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        _ = try retryingEINTR("connect(\(path))") {
            withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        return s
    }

    /// `host` is an IPv4 or IPv6 literal, or `localhost`.
    public static func tcp(host: String, port: Int, timeoutSeconds: Int = 30) throws(SyscallError) -> ClientSocket {
        let h = host == "localhost" ? "127.0.0.1" : host
        var v4 = sockaddr_in()
        var v6 = sockaddr_in6()
        let isV4 = inet_pton(AF_INET, h, &v4.sin_addr) == 1
        guard isV4 || inet_pton(AF_INET6, h, &v6.sin6_addr) == 1 else {
            throw SyscallError(call: "inet_pton(\(host))", errno: .invalidArgument)
        }
        let fd = try retryingEINTR("socket(AF_INET)") {
            socket(isV4 ? AF_INET : AF_INET6, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        let s = ClientSocket(fd: fd)
        s.setTimeout(timeoutSeconds)
        let call = "connect(\(host):\(port))"
        if isV4 {
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = UInt16(port).bigEndian
            _ = try retryingEINTR(call) {
                withUnsafePointer(to: &v4) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
            }
        } else {
            v6.sin6_family = sa_family_t(AF_INET6)
            v6.sin6_port = UInt16(port).bigEndian
            _ = try retryingEINTR(call) {
                withUnsafePointer(to: &v6) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
                }
            }
        }
        return s
    }

    private func setTimeout(_ seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    public func sendAll(_ bytes: [UInt8]) throws(SyscallError) {
        var offset = 0
        while offset < bytes.count {
            let n = try retryingEINTR("send") {
                bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            }
            offset += n
        }
    }

    /// Reads until the peer closes.
    public func readAll() throws(SyscallError) -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = try retryingEINTR("recv") { chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) } }
            if n == 0 { return out }
            out.append(contentsOf: chunk[0..<n])
        }
    }
}
