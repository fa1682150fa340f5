#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// An epoll instance, and the owner of its fd: closed once, when the owner goes.
public struct Epoll: ~Copyable, Sendable {
    public let fd: Int32

    deinit { closeFD(fd) }

    public init() throws(SyscallError) {
        fd = try retryingEINTR("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
    }

    /// Readiness to read; errors and hang-ups are always reported by the kernel.
    public static let readable = UInt32(EPOLLIN.rawValue)
    public static let error = UInt32(EPOLLERR.rawValue)
    public static let hangup = UInt32(EPOLLHUP.rawValue)
    /// The peer closed its end of a stream socket (or shut down writing).
    public static let peerHangup = UInt32(EPOLLRDHUP.rawValue)

    /// Watches `target` for `events` (input by default), tagging them with `token`.
    public func add(_ target: Int32, token: UInt64, events: UInt32 = Epoll.readable) throws(SyscallError) {
        var ev = epoll_event()
        ev.events = events
        ev.data.u64 = token
        _ = try retryingEINTR("epoll_ctl(EPOLL_CTL_ADD)") { epoll_ctl(fd, EPOLL_CTL_ADD, target, &ev) }
    }

    /// Stops watching `target`. ENOENT (not watched) is not an error: removal is idempotent.
    public func remove(_ target: Int32) throws(SyscallError) {
        var ev = epoll_event()
        do {
            _ = try retryingEINTR("epoll_ctl(EPOLL_CTL_DEL)") { epoll_ctl(fd, EPOLL_CTL_DEL, target, &ev) }
        } catch where error.errno == .noSuchFile {
            return
        }
    }

    /// A fixed buffer of events, allocated once per loop so waiting allocates nothing.
    public final class Events: @unchecked Sendable {
        // SAFETY: used only by the thread that owns the epoll loop.
        let buffer: UnsafeMutablePointer<epoll_event>
        public let capacity: Int

        public init(capacity: Int) {
            self.capacity = capacity
            buffer = .allocate(capacity: capacity)
            buffer.initialize(repeating: epoll_event(), count: capacity)
        }

        deinit { buffer.deallocate() }

        @inline(__always) public func token(_ i: Int) -> UInt64 { buffer[i].data.u64 }
        @inline(__always) public func flags(_ i: Int) -> UInt32 { buffer[i].events }
    }

    /// Waits for events; returns how many of `events` were filled (0 on EINTR).
    public func wait(into events: Events, timeoutMilliseconds: Int32) throws(SyscallError) -> Int {
        let n = epoll_wait(fd, events.buffer, Int32(events.capacity), timeoutMilliseconds)
        if n >= 0 { return Int(n) }
        let err = Errno.current
        if err == .interrupted { return 0 }
        throw SyscallError(call: "epoll_wait", errno: err)
    }

}

/// An eventfd used as a doorbell (the control path rings it, a worker drains it), and the
/// owner of its fd: closed once, when the owner goes.
public struct EventFD: ~Copyable, Sendable {
    public let fd: Int32

    deinit { closeFD(fd) }

    /// The corresponding C function is `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
    public init() throws(SyscallError) {
        fd = try retryingEINTR("eventfd") { eventfd(0, Int32(EFD_CLOEXEC) | Int32(EFD_NONBLOCK)) }
    }

    /// Adds one to the counter, waking any epoll that watches it. Cannot fail for a valid
    /// eventfd short of counter overflow (2^64 - 2 rings), so failure traps.
    public func signal() {
        var one: UInt64 = 1
        while true {
            let n = Glibc.write(fd, &one, 8)
            if n == 8 { return }
            if n == -1 && errno == EINTR { continue }
            preconditionFailure("eventfd write failed: \(Errno.current)")
        }
    }

    /// Resets the counter to zero.
    public func drain() {
        var value: UInt64 = 0
        _ = Glibc.read(fd, &value, 8)
    }
}
