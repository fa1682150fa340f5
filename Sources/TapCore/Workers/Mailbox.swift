import Dispatch
import Synchronization
import TunKit

/// A queue as a worker needs it: the fd to poll, where to count, what to do with frames.
struct PolledQueue: Sendable {
    /// Unique for the daemon's life; how the control path names the queue to its worker.
    let key: UInt64
    /// The device's key, reported back if the device vanishes.
    let device: UInt64
    /// Borrowed: the queue's owner (the manager's `QueueFile`) keeps it open until the worker
    /// has completed the `remove` for this key.
    let fd: Int32
    let counters: CounterBlock
    let action: QueueAction
    /// The queue's id: which peer queue a forwarded frame goes to (id modulo their count).
    let index: Int
    /// The vnet header in front of every frame (0 without IFF_VNET_HDR): not counted in bytes,
    /// as the kernel does not count it.
    let headerBytes: Int
    /// The queue's open file was handed out (a lease): its `O_NONBLOCK`, which belongs to the
    /// open file, is the holder's too, so the worker never reads it with blocking reads.
    var shared = false
}

/// What the control path asks of a worker.
enum WorkerCommand: Sendable {
    case add(PolledQueue, Completion)
    /// Stop polling; completes once the fd is out of the worker's epoll set, after which
    /// the control path may close it.
    case remove(key: UInt64, Completion)
    /// Completes once frames read from then on get the new action.
    case setAction(key: UInt64, QueueAction, Completion)
    case stop
}

/// The control path waits on this until the worker has done what it was asked.
final class Completion: @unchecked Sendable {
    // SAFETY (@unchecked): `error` is written by the worker before `signal()` and read by
    // the control path after `wait()`; the semaphore orders the two.
    private let done = DispatchSemaphore(value: 0)
    private var error: SyscallError?

    func finish(_ error: SyscallError? = nil) {
        self.error = error
        done.signal()
    }

    func wait() throws(SyscallError) {
        done.wait()
        if let error { throw error }
    }
}

/// How commands reach a worker: a list under a mutex, an eventfd that wakes its epoll loop,
/// and a kick for a worker asleep in a blocking read of its only queue (`solo`). The whole
/// protocol between `post` (any thread) and `take`/`enterSolo`/`leaveSolo` (the worker) is
/// here.
final class Mailbox: Sendable {
    private let commands = Mutex<[WorkerCommand]>([])
    /// Commands wait: set by `post`, cleared by `take`.
    private let pending = Atomic<Bool>(false)
    /// The worker reads its only queue with blocking reads, so a command needs a kick.
    private let soloing = Atomic<Bool>(false)
    /// Rung for every command; the worker's epoll set watches it.
    let bell: EventFD

    init() throws(SyscallError) {
        bell = try EventFD()
    }

    /// Queues a command and wakes the worker wherever it sleeps.
    func post(_ command: WorkerCommand, kick: () -> Void) {
        commands.withLock { $0.append(command) }
        // Sequentially consistent, with the worker's store of `soloing` and load of `pending`
        // in the opposite order (`enterSolo` then `hasPending`): either the worker sees the
        // command before it blocks, or this sees that it blocks (or may) and kicks it.
        pending.store(true, ordering: .sequentiallyConsistent)
        bell.signal()
        if soloing.load(ordering: .sequentiallyConsistent) { kick() }
    }

    /// Whether commands wait (the worker checks before and between blocking reads).
    @inline(__always) var hasPending: Bool { pending.load(ordering: .sequentiallyConsistent) }

    /// The worker is about to read `fd` with blocking reads; a post from now on kicks it.
    /// The fd must stay open until `leaveSolo` (see `Kick.arm`).
    func enterSolo(_ fd: Int32) {
        Kick.arm(fd)
        soloing.store(true, ordering: .sequentiallyConsistent)
    }

    func leaveSolo() {
        soloing.store(false, ordering: .sequentiallyConsistent)
        Kick.disarm()
    }

    /// Takes every waiting command (the worker only).
    func take() -> [WorkerCommand] {
        // Cleared before the list is taken: a command posted after the take sets it again.
        pending.store(false, ordering: .sequentiallyConsistent)
        bell.drain()
        return commands.withLock { list in
            let taken = list
            list.removeAll(keepingCapacity: true)
            return taken
        }
    }
}
