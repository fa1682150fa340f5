#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// What only a connected Unix socket does: peer credentials and passing fds (`SCM_RIGHTS`).
/// The fds here are borrowed; their owners close them.
public enum UnixSocket {
    /// Whether `fd` is a Unix socket. Over TCP, SO_PEERCRED answers pid 0 and passed fds are
    /// silently dropped, so both are only trusted after this.
    /// The corresponding C function is `getsockname(2)`.
    public static func isUnix(_ fd: Int32) -> Bool { mqt_socket_family(fd) == AF_UNIX }

    /// Who is at the other end: the peer's pid, uid and gid, as the kernel saw them at
    /// connect time.
    public static func peerCredentials(_ fd: Int32) throws(SyscallError) -> (pid: Int32, uid: UInt32, gid: UInt32) {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
        let rc = mqt_peer_cred(fd, &pid, &uid, &gid)
        if rc < 0 { throw SyscallError(call: "getsockopt(SO_PEERCRED)", errno: Errno(-rc)) }
        return (pid, uid, gid)
    }

    /// Writes all of `bytes`, the fds travelling with the first write (one SCM_RIGHTS
    /// message), waiting up to `timeoutMilliseconds` in all while the socket is full.
    /// The corresponding C functions are `sendmsg(2)` and `poll(2)`.
    public static func send(_ fd: Int32, _ bytes: [UInt8], passing fds: [Int32],
                            timeoutMilliseconds: Int32 = 5000) throws(SyscallError) {
        precondition(!bytes.isEmpty, "fds travel with at least one byte")
        var offset = 0
        var pending = fds
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw in
                pending.withUnsafeBufferPointer { f in
                    mqt_send_fds(fd, raw.baseAddress! + offset, UInt(raw.count - offset), f.baseAddress, Int32(f.count))
                }
            }
            if n == -Int(EAGAIN) {
                try waitWritable(fd, timeoutMilliseconds)
                continue
            }
            if n < 0 { throw SyscallError(call: "sendmsg(SCM_RIGHTS)", errno: Errno(Int32(-n))) }
            offset += n
            pending = []
        }
    }

    /// Reads what is there (blocking unless the socket is non-blocking), with any fds that
    /// came with it (close-on-exec). The corresponding C function is `recvmsg(2)`.
    public static func receive(_ fd: Int32, capacity: Int = 65536, maxFDs: Int = 253)
        throws(SyscallError) -> (bytes: [UInt8], fds: [Int32]) {
        var buf = [UInt8](repeating: 0, count: capacity)
        var fds = [Int32](repeating: -1, count: max(maxFDs, 1))
        var got: Int32 = 0
        let n = buf.withUnsafeMutableBytes { raw in
            fds.withUnsafeMutableBufferPointer { f in
                mqt_recv_fds(fd, raw.baseAddress, UInt(raw.count), f.baseAddress, Int32(maxFDs), &got)
            }
        }
        if n < 0 {
            for i in 0..<Int(got) { closeFD(fds[i]) }
            throw SyscallError(call: "recvmsg(SCM_RIGHTS)", errno: Errno(Int32(-n)))
        }
        return (Array(buf[0..<n]), Array(fds[0..<Int(got)]))
    }

    /// Whether the peer has closed its end (or the socket failed): a non-blocking peek that
    /// reads nothing away. Bytes waiting are not a close.
    /// The corresponding C function is `recv(2)` with `MSG_PEEK | MSG_DONTWAIT`.
    public static func peerClosed(_ fd: Int32) -> Bool {
        var byte: UInt8 = 0
        let n = recv(fd, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
        if n == 0 { return true }
        if n > 0 { return false }
        let e = errno
        return !(e == EAGAIN || e == EINTR)
    }

    /// Reads and drops what the peer sent (a lease's peer has nothing to say), at most 16 KiB
    /// a call, so a peer that keeps writing cannot hold the caller.
    /// The corresponding C function is `recv(2)` with `MSG_DONTWAIT`.
    public static func drain(_ fd: Int32) {
        var buf = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<4 {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n <= 0 { return }
        }
    }

    /// Shuts both directions down, so the peer reads end of file at once (the fd itself stays
    /// its owner's to close).
    public static func shutdownBoth(_ fd: Int32) { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    private static func waitWritable(_ fd: Int32, _ timeout: Int32) throws(SyscallError) {
        var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        let rc = try retryingEINTR("poll") { poll(&p, 1, timeout) }
        if rc == 0 { throw SyscallError(call: "poll(POLLOUT)", errno: Errno(ETIMEDOUT)) }
    }
}
