#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// A socket address (Unix path, IPv4 or IPv6), built once and handed to bind, connect or
/// sendto. The one place that lays out `sockaddr_*` structures.
struct SocketAddress {
    private var storage = sockaddr_storage()
    let length: socklen_t
    let family: Int32

    /// A Unix address; `@name` is an abstract-namespace name.
    static func unix(_ path: String) throws(SyscallError) -> SocketAddress {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw SyscallError(call: "sockaddr_un(\(path))", errno: Errno(ENAMETOOLONG))
        }
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        // Abstract names are exactly their bytes long; paths are NUL-terminated.
        let length = MemoryLayout<sa_family_t>.size + bytes.count + (bytes[0] == 0 ? 0 : 1)
        return SocketAddress(addr, length: length, family: AF_UNIX)
    }

    /// `host` is an IPv4 or IPv6 literal, or `localhost` (127.0.0.1).
    static func inet(host: String, port: Int) throws(SyscallError) -> SocketAddress {
        let h = host == "localhost" ? "127.0.0.1" : host
        var v4 = sockaddr_in()
        if inet_pton(AF_INET, h, &v4.sin_addr) == 1 {
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = UInt16(port).bigEndian
            return SocketAddress(v4, length: MemoryLayout<sockaddr_in>.size, family: AF_INET)
        }
        var v6 = sockaddr_in6()
        if inet_pton(AF_INET6, h, &v6.sin6_addr) == 1 {
            v6.sin6_family = sa_family_t(AF_INET6)
            v6.sin6_port = UInt16(port).bigEndian
            return SocketAddress(v6, length: MemoryLayout<sockaddr_in6>.size, family: AF_INET6)
        }
        throw SyscallError(call: "inet_pton(\(host))", errno: .invalidArgument)
    }

    private init<T>(_ addr: T, length: Int, family: Int32) {
        precondition(MemoryLayout<T>.size <= MemoryLayout<sockaddr_storage>.size)
        // SAFETY: sockaddr_storage is large and aligned enough for every sockaddr_* type.
        withUnsafeMutableBytes(of: &storage) { raw in
            withUnsafeBytes(of: addr) { raw.copyMemory(from: $0) }
        }
        self.length = socklen_t(length)
        self.family = family
    }

    func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafeBytes(of: storage) { raw in
            // SAFETY: the storage holds a sockaddr_* whose first field is the family, as the
            // socket calls expect; `length` says how much of it is the address.
            body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
        }
    }

    /// A new socket of this address's family. The corresponding C function is `socket(2)`.
    func socket(_ type: __socket_type, flags: Int32 = 0) throws(SyscallError) -> Int32 {
        let family = self.family
        return try retryingEINTR("socket(\(family == AF_UNIX ? "AF_UNIX" : family == AF_INET ? "AF_INET" : "AF_INET6"))") {
            Glibc.socket(family, Int32(type.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | flags, 0)
        }
    }
}

/// Listening sockets for the API, made here so that the HTTP layer only serves them.
public enum ListenSocket {
    /// A Unix socket at `path` with permissions `mode`, its directory created if missing.
    ///
    /// A socket file left by a crashed instance is replaced; one that a live instance still
    /// accepts on is not: that fails with EADDRINUSE, and the caller says which path.
    public static func unix(path: String, mode: UInt32 = 0o660) throws(SyscallError) -> Int32 {
        let address = try SocketAddress.unix(path)
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            try makeDirectories(String(path[..<slash]))
        }
        if access(path, F_OK) == 0 {
            if isAcceptingUnix(path) { throw SyscallError(call: "bind(\(path))", errno: .addressInUse) }
            _ = unlink(path)
        }
        let fd = try address.socket(SOCK_STREAM, flags: Int32(SOCK_NONBLOCK.rawValue))
        do throws(SyscallError) {
            _ = try retryingEINTR("bind(\(path))") { address.withSockaddr { bind(fd, $0, $1) } }
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
        let address = try SocketAddress.inet(host: host, port: port)
        let fd = try address.socket(SOCK_STREAM, flags: Int32(SOCK_NONBLOCK.rawValue))
        do throws(SyscallError) {
            var one: Int32 = 1
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            _ = try retryingEINTR("bind(\(host):\(port))") { address.withSockaddr { bind(fd, $0, $1) } }
            _ = try retryingEINTR("listen(\(host):\(port))") { listen(fd, 128) }
            var bound = sockaddr_in6()
            var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
            _ = try retryingEINTR("getsockname") {
                // SAFETY: sockaddr_in6 is large enough for either family; `len` says so.
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
        guard let address = try? SocketAddress.unix(path), let fd = try? address.socket(SOCK_STREAM) else { return false }
        defer { closeFD(fd) }
        return address.withSockaddr { connect(fd, $0, $1) } == 0
    }
}

/// A connected stream socket for a client (the `mqtap` CLI): Unix or TCP, with a timeout.
public final class ClientSocket {
    public let fd: Int32

    private init(fd: Int32) { self.fd = fd }

    deinit { closeFD(fd) }

    public static func unix(_ path: String, timeoutSeconds: Int = 30) throws(SyscallError) -> ClientSocket {
        try connect(SocketAddress.unix(path), "connect(\(path))", timeoutSeconds)
    }

    /// `host` is an IPv4 or IPv6 literal, or `localhost`.
    public static func tcp(host: String, port: Int, timeoutSeconds: Int = 30) throws(SyscallError) -> ClientSocket {
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
}
