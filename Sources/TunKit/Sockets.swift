#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// Listening sockets for the API, made here so that the HTTP layer only serves them.
public enum ListenSocket {
    /// A Unix socket at `path` with permissions `mode`, its directory created if missing.
    ///
    /// A socket file left by a crashed instance is replaced; one that a live instance still
    /// accepts on is not: that fails with EADDRINUSE, and the caller says which path.
    public static func unix(path: String, mode: UInt32 = 0o660) throws(SyscallError) -> Int32 {
        let maxPath = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1
        guard path.utf8.count <= maxPath else {
            throw SyscallError(call: "bind(\(path))", errno: Errno(ENAMETOOLONG))
        }
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            try makeDirectories(String(path[..<slash]))
        }
        if access(path, F_OK) == 0 {
            if isAcceptingUnix(path) { throw SyscallError(call: "bind(\(path))", errno: Errno(EADDRINUSE)) }
            _ = unlink(path)
        }
        let fd = try retryingEINTR("socket(AF_UNIX)") {
            socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        }
        do throws(SyscallError) {
            var addr = unixAddress(path)
            _ = try retryingEINTR("bind(\(path))") {
                withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                    }
                }
            }
            _ = try retryingEINTR("chmod(\(path))") { chmod(path, mode_t(mode)) }
            _ = try retryingEINTR("listen(\(path))") { listen(fd, 128) }
        } catch {
            closeFD(fd)
            throw error
        }
        return fd
    }

    /// A TCP socket on `host` (an IPv4 or IPv6 literal, or `localhost`) and `port` (0: any
    /// free port). Returns the fd and the port it got.
    public static func tcp(host: String, port: Int) throws(SyscallError) -> (fd: Int32, port: Int) {
        let h = host == "localhost" ? "127.0.0.1" : host
        var v4 = sockaddr_in()
        var v6 = sockaddr_in6()
        let isV4 = inet_pton(AF_INET, h, &v4.sin_addr) == 1
        let isV6 = !isV4 && inet_pton(AF_INET6, h, &v6.sin6_addr) == 1
        guard isV4 || isV6 else { throw SyscallError(call: "inet_pton(\(host))", errno: .invalidArgument) }
        let family = isV4 ? AF_INET : AF_INET6
        let fd = try retryingEINTR("socket(AF_INET)") {
            socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        }
        do throws(SyscallError) {
            var one: Int32 = 1
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            let call = "bind(\(host):\(port))"
            if isV4 {
                v4.sin_family = sa_family_t(AF_INET)
                v4.sin_port = UInt16(port).bigEndian
                _ = try retryingEINTR(call) {
                    withUnsafePointer(to: &v4) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                    }
                }
            } else {
                v6.sin6_family = sa_family_t(AF_INET6)
                v6.sin6_port = UInt16(port).bigEndian
                _ = try retryingEINTR(call) {
                    withUnsafePointer(to: &v6) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
                    }
                }
            }
            _ = try retryingEINTR("listen(\(host):\(port))") { listen(fd, 128) }
            var bound = sockaddr_in6()
            var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
            _ = try retryingEINTR("getsockname") {
                withUnsafeMutablePointer(to: &bound) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
                }
            }
            // sin_port and sin6_port sit at the same offset.
            return (fd, Int(UInt16(bigEndian: bound.sin6_port)))
        } catch {
            closeFD(fd)
            throw error
        }
    }

    /// Whether something accepts connections on the Unix socket at `path`.
    public static func isAcceptingUnix(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { closeFD(fd) }
        var addr = unixAddress(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        return rc == 0
    }

    private static func unixAddress(_ path: String) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
        }
        return addr
    }
}

/// `mkdir -p` with mode 0755 for directories it creates.
public func makeDirectories(_ path: String) throws(SyscallError) {
    var current = path.hasPrefix("/") ? "" : "."
    for part in path.split(separator: "/") {
        current += "/" + part
        if mkdir(current, 0o755) == -1 && errno != EEXIST {
            throw SyscallError(call: "mkdir(\(current))", errno: Errno.current)
        }
    }
}

/// Removes a file; a missing file is not an error. The corresponding C function is `unlink(2)`.
public func removeFile(_ path: String) {
    _ = unlink(path)
}

/// Signals delivered synchronously: blocked in every thread, then awaited with `sigwait`.
public enum Signals {
    public static let terminate = SIGTERM
    public static let interrupt = SIGINT

    /// Blocks `signals` in the calling thread and in every thread it starts afterwards (the
    /// mask is inherited), so only `wait` receives them. Call before starting any thread.
    public static func block(_ signals: [Int32]) {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        // A write to a closed client socket must be an EPIPE error, not the end of the process.
        signal(SIGPIPE, SIG_IGN)
    }

    /// Waits for one of `signals` (blocked beforehand) and returns it.
    public static func wait(_ signals: [Int32]) -> Int32 {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        var received: Int32 = 0
        while sigwait(&set, &received) != 0 {}
        return received
    }

    /// Sends `signal` to this process (tests, and a second way to stop).
    public static func raise(_ signal: Int32) { kill(getpid(), signal) }
}
