import CCounters
import Dispatch
import Synchronization
import TunKit

/// A queue as a worker needs it: the fd to poll, where to count, what to do with frames.
struct PolledQueue: Sendable {
    /// Unique for the daemon's life; how the control path names the queue to its worker.
    let key: UInt64
    /// The device's key, reported back if the device vanishes.
    let device: UInt64
    let fd: Int32
    let counters: CounterBlock
    let mode: DeviceMode
    /// Where the Ethernet header starts in a frame (after the vnet header, if any);
    /// nil for TUN, whose frames have no MAC addresses to swap.
    let macOffset: Int?
}

/// A worker's note that reads or writes on a queue failed: at most one per queue per second
/// (`suppressed` counts the failures in between), so a failing queue cannot flood the log.
struct ErrorReport: Sendable {
    let errno: Errno
    let write: Bool
    let suppressed: UInt64
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

enum WorkerCommand: Sendable {
    case add(PolledQueue, Completion)
    /// Stop polling; completes once the fd is out of the worker's epoll set, after which
    /// the control path may close it.
    case remove(key: UInt64, Completion)
    /// Completes once frames read from then on get the new mode.
    case setMode(key: UInt64, DeviceMode, Completion)
    case stop
}

/// One worker thread: an epoll loop over the queue fds it owns and an eventfd doorbell.
///
/// A worker that owns exactly one queue reads it with blocking reads instead (`solo`): one
/// system call per frame, sleeping inside read() as a plain C receiver does. Through epoll
/// every wake-up costs an epoll_wait and a read that ends in EAGAIN on top of the frames,
/// about 10% more CPU per frame at one queue (bench/RESULTS.md). Commands reach a solo worker
/// by a kick (TunKit's `Kick`), which cannot be lost between its check and its read.
final class Worker: @unchecked Sendable {
    // SAFETY (@unchecked): `slots`, `freeSlots`, `slotOfKey`, `polledCount`, `frame` and
    // `events` are touched only by the worker thread (from `run`); the control path reaches
    // the worker only through `mailbox` (a Mutex), `pending` and `soloing` (atomics), `bell`
    // (an eventfd) and a kick, and reads `thread` only after `start` has set it (the pool is
    // not shared before every worker has started).
    let index: Int
    private let epoll: Epoll
    private let bell: EventFD
    private let mailbox = Mutex<[WorkerCommand]>([])
    /// Commands wait in the mailbox: set by `post`, cleared by `runCommands`.
    private let pending = Atomic<Bool>(false)
    /// The worker reads its only queue with blocking reads, so a command needs a kick.
    private let soloing = Atomic<Bool>(false)
    private let onGone: @Sendable (UInt64) -> Void
    private let onErrors: @Sendable (UInt64, UInt64, ErrorReport) -> Void
    private var thread: NamedThread?

    private struct Slot {
        var key: UInt64 = 0
        var device: UInt64 = 0
        var fd: Int32 = -1
        var counters: UnsafeMutablePointer<mqt_counters>?
        /// Keeps `counters` alive while the slot points at it.
        var owner: CounterBlock?
        var echo = false
        var macOffset = -1
        /// The worker reads this queue.
        var polled = false
        /// The fd is in the epoll set (a solo queue is not).
        var watched = false
        /// Rate limit of error reports: when the last went out, and failures since.
        var lastReport: UInt64 = 0
        var unreported: UInt64 = 0
    }

    /// What one read of a queue came to.
    private enum ReadOutcome {
        case frame, empty, gone, failed
    }

    // Only the worker thread touches these (see the SAFETY note above), so the dynamic
    // exclusivity checks Swift would make on every packet-path access are skipped.
    @exclusivity(unchecked) private var slots: [Slot] = []
    private var freeSlots: [Int] = []
    private var slotOfKey: [UInt64: Int] = [:]
    private var polledCount = 0
    /// One frame buffer per worker, reused for every read: no allocation per frame.
    private let frame: UnsafeMutableRawPointer
    private let events = Epoll.Events(capacity: 64)

    private static let bellToken = UInt64.max
    /// The largest frame a tun fd returns (64 KiB) plus room for a vnet header.
    static let frameCapacity = 65536 + 64
    /// Frames read from one queue before the worker looks at its other queues.
    static let batch = 64

    init(index: Int, onGone: @escaping @Sendable (UInt64) -> Void,
         onErrors: @escaping @Sendable (UInt64, UInt64, ErrorReport) -> Void) throws(SyscallError) {
        self.index = index
        self.onGone = onGone
        self.onErrors = onErrors
        try Kick.install()
        epoll = try Epoll()
        do {
            bell = try EventFD()
        } catch {
            epoll.close()
            throw error
        }
        do {
            try epoll.add(bell.fd, token: Self.bellToken)
        } catch {
            bell.close()
            epoll.close()
            throw error
        }
        frame = .allocate(byteCount: Self.frameCapacity, alignment: 64)
    }

    deinit {
        frame.deallocate()
        bell.close()
        epoll.close()
    }

    func start() throws(SyscallError) {
        thread = try NamedThread(name: "mqtapd-w\(index)") { [self] in run() }
    }

    func join() { thread?.join() }

    func post(_ command: WorkerCommand) {
        mailbox.withLock { $0.append(command) }
        // Sequentially consistent, with the worker's store of `soloing` and load of `pending`
        // in the opposite order: either the worker sees the command before it blocks, or
        // this sees that it blocks (or may) and kicks it.
        pending.store(true, ordering: .sequentiallyConsistent)
        bell.signal()
        if soloing.load(ordering: .sequentiallyConsistent) { thread?.kick() }
    }

    private func run() {
        do {
            try Kick.prepareThread()
        } catch {
            preconditionFailure("worker \(index): \(error)")
        }
        var running = true
        while running {
            if polledCount == 1 && !pending.load(ordering: .sequentiallyConsistent) {
                solo(slots.firstIndex(where: \.polled)!)
                if pending.load(ordering: .sequentiallyConsistent) { running = runCommands() }
                continue
            }
            let n: Int
            do {
                n = try epoll.wait(into: events, timeoutMilliseconds: -1)
            } catch {
                // epoll_wait fails only with EBADF/EFAULT/EINVAL on an epoll we own: a bug.
                preconditionFailure("worker \(index): \(error)")
            }
            var rang = false
            for i in 0..<n {
                let token = events.token(i)
                if token == Self.bellToken {
                    rang = true
                    continue
                }
                let s = Int(truncatingIfNeeded: token)
                guard s < slots.count, slots[s].polled else { continue }
                if events.flags(i) & (Epoll.error | Epoll.hangup) != 0 {
                    lose(s)
                } else {
                    service(s)
                }
            }
            // Commands run after the batch, so no event of this batch can name a slot that a
            // command has just freed and reused.
            if rang { running = runCommands() }
        }
    }

    /// Reads up to `batch` frames from one queue (non-blocking, after epoll said readable).
    @inline(__always)
    private func service(_ s: Int) {
        for _ in 0..<Self.batch {
            switch readOne(s) {
            case .frame: continue
            case .gone: lose(s)
            case .empty, .failed: break
            }
            return
        }
    }

    /// Reads the worker's only queue with blocking reads until a command is posted (a kick
    /// makes the fd non-blocking, so the read returns) or the queue fails.
    private func solo(_ s: Int) {
        let fd = slots[s].fd
        // Out of the epoll set while solo, not merely muted: a watched fd costs the sender of
        // every frame an epoll callback, which slowed the generator in bench by ~10%. It goes
        // back in when a second queue comes (`add`), where a failure can be reported.
        if slots[s].watched {
            try? epoll.remove(fd)
            slots[s].watched = false
        }
        do {
            try setNonBlocking(fd, false)
        } catch {
            preconditionFailure("worker \(index): \(error) on a queue fd it owns")
        }
        // The fd stays open while armed: the control path closes a queue's fd only after the
        // worker has completed its `remove`, which runs after this returns.
        Kick.arm(fd)
        soloing.store(true, ordering: .sequentiallyConsistent)
        var outcome = ReadOutcome.frame
        while case .frame = outcome, !pending.load(ordering: .sequentiallyConsistent) {
            outcome = readOne(s)
        }
        soloing.store(false, ordering: .sequentiallyConsistent)
        Kick.disarm()
        if case .gone = outcome { lose(s) }
    }

    /// Puts a queue fd in the epoll set, non-blocking (a solo read or a kick may have left it
    /// either way).
    private func watch(_ s: Int) throws(SyscallError) {
        try setNonBlocking(slots[s].fd, true)
        try epoll.add(slots[s].fd, token: UInt64(s))
        slots[s].watched = true
    }

    /// One read of a queue, the frame counted (and echoed) as it arrives, so the counters are
    /// current even when the next read sleeps. The packet path: no lock, no allocation.
    @inline(__always)
    private func readOne(_ s: Int) -> ReadOutcome {
        let fd = slots[s].fd
        let counters = slots[s].counters!
        switch readFrame(fd, into: frame, capacity: Self.frameCapacity) {
        case .done(0):
            // End of file: tun never returns it; a closed peer (a vanished queue) does.
            return .gone
        case .done(let n):
            mqt_counter_add(&counters.pointee.rx_packets, 1)
            mqt_counter_add(&counters.pointee.rx_bytes, UInt64(n))
            guard slots[s].echo else { return .frame }
            let macOffset = slots[s].macOffset
            if macOffset >= 0 && n >= macOffset + 12 { swapMACs(frame + macOffset) }
            switch writeFrame(fd, from: frame, count: n) {
            case .done(let w) where w == n:
                mqt_counter_add(&counters.pointee.tx_packets, 1)
                mqt_counter_add(&counters.pointee.tx_bytes, UInt64(n))
            case .done:
                mqt_counter_add(&counters.pointee.tx_errors, 1)
                noteError(s, .ioError, write: true)
            case .failed(let e):
                mqt_counter_add(&counters.pointee.tx_errors, 1)
                noteError(s, e, write: true)
            }
            return .frame
        case .failed(let e):
            switch e.rawValue {
            case Errno.wouldBlock.rawValue:
                return .empty
            case Errno.badFileDescriptorState.rawValue, Errno.badAddress.rawValue:
                // The device was deleted behind our back (reads give EFAULT, then EBADFD).
                return .gone
            default:
                mqt_counter_add(&counters.pointee.rx_errors, 1)
                noteError(s, e, write: false)
                return .failed
            }
        }
    }

    /// Off the fast path (only after a failure): report at most once a second per queue.
    private func noteError(_ s: Int, _ errno: Errno, write: Bool) {
        slots[s].unreported &+= 1
        let now = Clock.monotonicNanoseconds()
        guard now &- slots[s].lastReport >= 1_000_000_000 else { return }
        onErrors(slots[s].device, slots[s].key, ErrorReport(errno: errno, write: write, suppressed: slots[s].unreported &- 1))
        slots[s].lastReport = now
        slots[s].unreported = 0
    }

    /// Swaps destination and source MAC in place, so the echoed frame goes back to its sender.
    @inline(__always)
    private func swapMACs(_ p: UnsafeMutableRawPointer) {
        for i in 0..<6 {
            let d = p.load(fromByteOffset: i, as: UInt8.self)
            p.storeBytes(of: p.load(fromByteOffset: 6 + i, as: UInt8.self), toByteOffset: i, as: UInt8.self)
            p.storeBytes(of: d, toByteOffset: 6 + i, as: UInt8.self)
        }
    }

    /// The queue's device is gone: stop polling it (an fd whose device vanished reports
    /// POLLERR forever; left in the set it would spin the loop) and tell the manager.
    private func lose(_ s: Int) {
        if slots[s].watched { try? epoll.remove(slots[s].fd) }
        slots[s].watched = false
        slots[s].polled = false
        polledCount -= 1
        onGone(slots[s].device)
    }

    /// Runs queued commands; false once told to stop.
    private func runCommands() -> Bool {
        // Cleared before the mailbox is taken: a command posted after the take sets it again.
        pending.store(false, ordering: .sequentiallyConsistent)
        bell.drain()
        let commands = mailbox.withLock { box in
            let taken = box
            box.removeAll(keepingCapacity: true)
            return taken
        }
        for command in commands {
            switch command {
            case .add(let q, let done):
                // A solo queue goes back into the epoll set first; if it cannot, the new
                // queue is refused and the worker stays as it was.
                if polledCount == 1, let only = slots.firstIndex(where: { $0.polled && !$0.watched }) {
                    do {
                        try watch(only)
                    } catch {
                        done.finish(error)
                        continue
                    }
                }
                let s: Int
                if let free = freeSlots.popLast() {
                    s = free
                } else {
                    slots.append(Slot())
                    s = slots.count - 1
                }
                slots[s] = Slot(key: q.key, device: q.device, fd: q.fd, counters: q.counters.pointer,
                                owner: q.counters, echo: q.mode == .echo, macOffset: q.macOffset ?? -1)
                do {
                    try watch(s)
                    slots[s].polled = true
                    polledCount += 1
                    slotOfKey[q.key] = s
                    done.finish()
                } catch {
                    slots[s] = Slot()
                    freeSlots.append(s)
                    done.finish(error)
                }
            case .remove(let key, let done):
                if let s = slotOfKey.removeValue(forKey: key) {
                    if slots[s].watched { try? epoll.remove(slots[s].fd) }
                    if slots[s].polled { polledCount -= 1 }
                    slots[s] = Slot()
                    freeSlots.append(s)
                }
                done.finish()
            case .setMode(let key, let mode, let done):
                if let s = slotOfKey[key] { slots[s].echo = mode == .echo }
                done.finish()
            case .stop:
                return false
            }
        }
        return true
    }
}

/// W worker threads; each queue belongs to one worker for its life.
final class WorkerPool: Sendable {
    private let workers: [Worker]
    /// Queues assigned per worker (attached or not): the control path's view, for
    /// least-loaded placement.
    private let load: Mutex<[Int]>
    private let stopped = Mutex(false)

    var count: Int { workers.count }

    /// Starts `count` workers. `onGone` is called on a worker thread with a device's key
    /// when one of its queues reports that the device vanished; `onErrors` with a device's
    /// and a queue's key when reads or writes failed (rate-limited). Neither may block.
    init(count: Int, onGone: @escaping @Sendable (UInt64) -> Void,
         onErrors: @escaping @Sendable (UInt64, UInt64, ErrorReport) -> Void = { _, _, _ in }) throws(SyscallError) {
        precondition(count >= 1, "a pool needs at least one worker")
        var made: [Worker] = []
        do {
            for i in 0..<count {
                let w = try Worker(index: i, onGone: onGone, onErrors: onErrors)
                try w.start()
                made.append(w)
            }
        } catch {
            for w in made { w.post(.stop) }
            for w in made { w.join() }
            throw error
        }
        workers = made
        load = Mutex([Int](repeating: 0, count: count))
    }

    /// Picks the least-loaded worker (lowest index on ties) and counts the queue on it.
    func reserve() -> Int {
        load.withLock { load in
            var best = 0
            for i in load.indices where load[i] < load[best] { best = i }
            load[best] += 1
            return best
        }
    }

    func release(_ worker: Int) {
        load.withLock { $0[worker] -= 1 }
    }

    /// Queues assigned to each worker.
    var loads: [Int] { load.withLock { $0 } }

    /// Makes `worker` poll the queue; returns once it does.
    func startPolling(_ queue: PolledQueue, on worker: Int) throws(SyscallError) {
        let done = Completion()
        workers[worker].post(.add(queue, done))
        try done.wait()
    }

    /// Makes `worker` stop polling the queue; returns once the fd is out of its epoll set,
    /// so the caller may close it.
    func stopPolling(key: UInt64, on worker: Int) {
        let done = Completion()
        workers[worker].post(.remove(key: key, done))
        try? done.wait()
    }

    /// Changes what the worker does with the queue's frames; returns once it applies.
    func setMode(key: UInt64, _ mode: DeviceMode, on worker: Int) {
        let done = Completion()
        workers[worker].post(.setMode(key: key, mode, done))
        try? done.wait()
    }

    /// Stops and joins every worker. Idempotent.
    func shutdown() {
        let first = stopped.withLock { s in
            defer { s = true }
            return !s
        }
        guard first else { return }
        for w in workers { w.post(.stop) }
        for w in workers { w.join() }
    }
}
