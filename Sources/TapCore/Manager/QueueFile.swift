import Synchronization
import TunKit

/// The owner of one queue fd: closes it (through the driver) exactly once, when the owner
/// goes. Not copyable, so there is never a second owner to close it again.
struct QueueFile: ~Copyable, Sendable {
    let fd: Int32
    private let driver: any TunDriver

    init(_ fd: Int32, driver: any TunDriver) {
        self.fd = fd
        self.driver = driver
    }

    deinit { driver.close(fd) }
}

/// Where a queue's owner lives while the queue is the manager's: one per queue, shared by
/// the manager's snapshots, closed once by the manager (`close()`), after every worker that
/// reads the fd has let go of it. A second `close()` does nothing.
final class QueueHandle: Sendable {
    private let file: Mutex<QueueFile?>
    private let shared = Atomic<Bool>(false)
    /// Borrowed: valid until `close()`. Handed to a worker's slot and to ioctls on the
    /// control path; the manager closes only after the worker's `remove` has completed.
    let fd: Int32

    init(_ file: consuming QueueFile) {
        fd = file.fd
        self.file = Mutex(file)
    }

    /// Closes the fd (the owner's deinit runs). Idempotent.
    func close() {
        let taken = file.withLock { $0.take() }
        _ = consume taken
    }

    /// Whether `close()` has run.
    var isClosed: Bool { file.withLock { $0 == nil } }

    /// The open file was handed out (a lease): another process may share it, with its
    /// `O_NONBLOCK`, for as long as it lives. Set once, never cleared.
    var isShared: Bool { shared.load(ordering: .acquiring) }

    /// Makes the open file non-blocking (what every VMM expects, and what the daemon's epoll
    /// reads need), then marks it shared: from here on its blocking mode is never changed.
    func share() throws(SyscallError) {
        try setNonBlocking(fd, true)
        shared.store(true, ordering: .releasing)
    }

    /// Runs `body` with the fd while it is open, holding off `close()` until it returns; nil
    /// once closed. For reads from a snapshot, which may be older than a close.
    func withOpenFD<T>(_ body: (Int32) -> T) -> T? {
        file.withLock { f in f == nil ? nil : body(fd) }
    }
}
