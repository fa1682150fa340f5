#if canImport(Glibc)
import Glibc
#endif
import TunKit

/// The two systemd protocols the daemon speaks, without libsystemd: socket activation
/// (`LISTEN_FDS`) and readiness notification (`NOTIFY_SOCKET`).
enum Systemd {
    /// The listening sockets systemd passed (fds 3, 4, … when `LISTEN_PID` is this process),
    /// made close-on-exec and non-blocking. The variables are removed so a child never
    /// takes them for its own.
    static func listenFDs() -> [Int32] {
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
    static func unixPath(of fd: Int32) -> String? {
        var addr = sockaddr_un()
        var len = socklen_t(MemoryLayout<sockaddr_un>.size)
        // SAFETY: the kernel writes at most `len` bytes, the size of the sockaddr_un given.
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
    static func notify(_ state: String) -> Bool {
        guard let raw = getenv("NOTIFY_SOCKET"), let address = try? SocketAddress.unix(String(cString: raw)),
              let fd = try? address.socket(SOCK_DGRAM) else { return false }
        defer { closeFD(fd) }
        let message = Array(state.utf8)
        let n = address.withSockaddr { sa, len in message.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, 0, sa, len) } }
        return n == message.count
    }
}

