#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// A socket address (Unix path, IPv4 or IPv6), built once and handed to bind, connect or
/// sendto. The one place that lays out `sockaddr_*` structures.
public struct SocketAddress {
    private var storage = sockaddr_storage()
    let length: socklen_t
    let family: Int32

    /// A Unix address; `@name` is an abstract-namespace name.
    public static func unix(_ path: String) throws(SyscallError) -> SocketAddress {
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
    public static func inet(host: String, port: Int) throws(SyscallError) -> SocketAddress {
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

    public func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        withUnsafeBytes(of: storage) { raw in
            // SAFETY: the storage holds a sockaddr_* whose first field is the family, as the
            // socket calls expect; `length` says how much of it is the address.
            body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
        }
    }

    /// A new socket of this address's family.
    public func socket(_ type: __socket_type, flags: Int32 = 0) throws(SyscallError) -> Int32 {
        let family = self.family
        return try retryingEINTR("socket(\(family == AF_UNIX ? "AF_UNIX" : family == AF_INET ? "AF_INET" : "AF_INET6"))") {
            Glibc.socket(family, Int32(type.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | flags, 0)
        }
    }
}

/// A listening socket, and the owner of its fd: closed once, when the owner goes (after the
/// server that accepted on it has stopped). A server that closes what it serves gets a copy.
public struct ListeningSocket: ~Copyable, Sendable {
    public let fd: Int32
    /// The TCP port it is bound to (the one asked for, or the one the kernel chose for 0);
    /// nil for a Unix socket.
    public let port: Int?

    /// Takes ownership of `fd` (e.g. one systemd passed).
    public init(adopting fd: Int32, port: Int? = nil) {
        self.fd = fd
        self.port = port
    }

    deinit { closeFD(fd) }

    /// A second number for the same socket (close-on-exec), for a server that closes the
    /// socket it serves (libmicrohttpd does when it stops): closing the copy leaves the
    /// socket open and listening here.
    /// The corresponding C call is `fcntl(F_DUPFD_CLOEXEC)`.
    public func copy() throws(SyscallError) -> Int32 {
        try retryingEINTR("fcntl(F_DUPFD_CLOEXEC)") { fcntl(fd, F_DUPFD_CLOEXEC, 0) }
    }

    /// Closes a copy its server did not take, if it is still open: libmicrohttpd closes the
    /// socket on some of its start failures and not on others. The number is closed only
    /// while it still names this socket (same device and inode): a number it closed, even if
    /// reused since, is left alone.
    public func closeCopyIfOpen(_ copy: Int32) {
        var mine = stat()
        var theirs = stat()
        guard fstat(fd, &mine) == 0, fstat(copy, &theirs) == 0,
              mine.st_dev == theirs.st_dev, mine.st_ino == theirs.st_ino else { return }
        closeFD(copy)
    }
}

/// Listening sockets for the API, made here so that the HTTP layer only serves them.
public enum ListenSocket {
    /// Connections the kernel queues until they are accepted: as many as the system allows
    /// (net.core.somaxconn caps it). The server stops accepting at its connection limit until
    /// the slowest are cut; meanwhile a full queue would make a non-blocking connect fail at
    /// once with EAGAIN (what curl does on a Unix socket), where a longer queue makes it wait
    /// its turn. With 128, a burst of 300 connects filled it on a busy machine and a health
    /// check was refused outright.
    static let backlog = SOMAXCONN

    /// A Unix socket at `path` with permissions `mode`, its directory created if missing.
    ///
    /// A socket file left by a crashed instance is replaced; one that a live instance still
    /// accepts on is not: that fails with EADDRINUSE, and the caller says which path. Anything
    /// else at the path (a file, a directory, a symlink) is left alone and fails.
    public static func unix(path: String, mode: UInt32 = 0o660) throws(SyscallError) -> ListeningSocket {
        let address = try SocketAddress.unix(path)
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            try makeDirectories(String(path[..<slash]))
        }
        // Only a socket file is ever replaced: a regular file or a directory at the path is
        // the caller's mistake, not a leftover, and stays as it is.
        var st = stat()
        if lstat(path, &st) == 0 {
            switch st.st_mode & S_IFMT {
            case S_IFSOCK:
                if isAcceptingUnix(path) { throw SyscallError(call: "bind(\(path))", errno: .addressInUse) }
                _ = unlink(path)
            case S_IFDIR:
                throw SyscallError(call: "bind(\(path))", errno: .isDirectory)
            default:
                throw SyscallError(call: "bind(\(path)): a file that is not a socket is there", errno: .exists)
            }
        }
        let fd = try address.socket(SOCK_STREAM, flags: Int32(SOCK_NONBLOCK.rawValue))
        do throws(SyscallError) {
            _ = try retryingEINTR("bind(\(path))") { address.withSockaddr { bind(fd, $0, $1) } }
            _ = try retryingEINTR("chmod(\(path))") { chmod(path, mode_t(mode)) }
            _ = try retryingEINTR("listen(\(path))") { listen(fd, ListenSocket.backlog) }
        } catch {
            closeFD(fd)
            throw error
        }
        return ListeningSocket(adopting: fd)
    }

    /// A TCP socket on `host` (an IPv4 or IPv6 literal, or `localhost`) and `port` (0: any
    /// free port); the socket knows the port it got.
    public static func tcp(host: String, port: Int) throws(SyscallError) -> ListeningSocket {
        let address = try SocketAddress.inet(host: host, port: port)
        let fd = try address.socket(SOCK_STREAM, flags: Int32(SOCK_NONBLOCK.rawValue))
        do throws(SyscallError) {
            var one: Int32 = 1
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            _ = try retryingEINTR("bind(\(host):\(port))") { address.withSockaddr { bind(fd, $0, $1) } }
            _ = try retryingEINTR("listen(\(host):\(port))") { listen(fd, ListenSocket.backlog) }
            var bound = sockaddr_in6()
            var len = socklen_t(MemoryLayout<sockaddr_in6>.size)
            _ = try retryingEINTR("getsockname") {
                // SAFETY: sockaddr_in6 is large enough for either family; `len` says so.
                withUnsafeMutablePointer(to: &bound) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
                }
            }
            // sin_port and sin6_port sit at the same offset.
            return ListeningSocket(adopting: fd, port: Int(UInt16(bigEndian: bound.sin6_port)))
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

/// `HOST:PORT`, with an IPv6 host in brackets (`[::1]:8080`): the one parser of the two for
/// `--listen tcp:…` and the CLI's `--url http://…`. Nil if malformed or the port is not
/// 0…65535.
public func splitHostPort(_ text: Substring) -> (host: String, port: Int)? {
    let host: Substring
    let port: Substring
    if text.hasPrefix("[") {
        guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
        host = text[text.index(after: text.startIndex)..<close]
        port = text[text.index(close, offsetBy: 2)...]
    } else {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        host = text[..<colon]
        port = text[text.index(after: colon)...]
    }
    guard !host.isEmpty, port.utf8.count <= 5, port.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }),
          let p = Int(port), (0...65535).contains(p) else { return nil }
    return (String(host), p)
}
