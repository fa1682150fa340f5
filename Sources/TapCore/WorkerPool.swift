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
final class Worker: @unchecked Sendable {
    // SAFETY (@unchecked): `slots`, `freeSlots`, `slotOfKey`, `frame` and `events` are
    // touched only by the worker thread (from `run`); the control path reaches the worker
    // only through `mailbox` (a Mutex) and `bell` (an eventfd), and reads `thread` only
    // from `join`, after `start` has set it.
    let index: Int
    private let epoll: Epoll
    private let bell: EventFD
    private let mailbox = Mutex<[WorkerCommand]>([])
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
        var polled = false
        /// Rate limit of error reports: when the last went out, and failures since.
        var lastReport: UInt64 = 0
        var unreported: UInt64 = 0
    }

    // Only the worker thread touches these (see the SAFETY note above), so the dynamic
    // exclusivity checks Swift would make on every packet-path access are skipped.
    @exclusivity(unchecked) private var slots: [Slot] = []
    private var freeSlots: [Int] = []
    private var slotOfKey: [UInt64: Int] = [:]
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
        bell.signal()
    }

    private func run() {
        var running = true
        while running {
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

    /// Reads up to `batch` frames from one queue; the packet path: no lock, no allocation.
    @inline(__always)
    private func service(_ s: Int) {
        let fd = slots[s].fd
        let counters = slots[s].counters!
        let echo = slots[s].echo
        let macOffset = slots[s].macOffset
        var rxPackets: UInt64 = 0, rxBytes: UInt64 = 0, rxErrors: UInt64 = 0
        var txPackets: UInt64 = 0, txBytes: UInt64 = 0, txErrors: UInt64 = 0
        var gone = false
        var lastError: (Errno, Bool)?
        reading: for _ in 0..<Self.batch {
            switch readFrame(fd, into: frame, capacity: Self.frameCapacity) {
            case .done(0):
                // End of file: not a frame (tun never returns it; a closed peer would).
                break reading
            case .done(let n):
                rxPackets &+= 1
                rxBytes &+= UInt64(n)
                guard echo else { continue }
                if macOffset >= 0 && n >= macOffset + 12 { swapMACs(frame + macOffset) }
                switch writeFrame(fd, from: frame, count: n) {
                case .done(let w) where w == n:
                    txPackets &+= 1
                    txBytes &+= UInt64(n)
                case .done:
                    txErrors &+= 1
                    lastError = (.ioError, true)
                case .failed(let e):
                    txErrors &+= 1
                    lastError = (e, true)
                }
            case .failed(let e):
                switch e.rawValue {
                case Errno.wouldBlock.rawValue:
                    break
                case Errno.badFileDescriptorState.rawValue, Errno.badAddress.rawValue:
                    // The device was deleted behind our back (reads give EFAULT, then EBADFD).
                    gone = true
                default:
                    rxErrors &+= 1
                    lastError = (e, false)
                }
                break reading
            }
        }
        if rxPackets != 0 {
            mqt_counter_add(&counters.pointee.rx_packets, rxPackets)
            mqt_counter_add(&counters.pointee.rx_bytes, rxBytes)
        }
        if txPackets != 0 {
            mqt_counter_add(&counters.pointee.tx_packets, txPackets)
            mqt_counter_add(&counters.pointee.tx_bytes, txBytes)
        }
        if rxErrors != 0 { mqt_counter_add(&counters.pointee.rx_errors, rxErrors) }
        if txErrors != 0 { mqt_counter_add(&counters.pointee.tx_errors, txErrors) }
        if let (errno, write) = lastError { noteErrors(s, errno, write: write, count: rxErrors &+ txErrors) }
        if gone { lose(s) }
    }

    /// Off the fast path (only after a failure): report at most once a second per queue.
    private func noteErrors(_ s: Int, _ errno: Errno, write: Bool, count: UInt64) {
        slots[s].unreported &+= count
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
        try? epoll.remove(slots[s].fd)
        slots[s].polled = false
        onGone(slots[s].device)
    }

    /// Runs queued commands; false once told to stop.
    private func runCommands() -> Bool {
        bell.drain()
        let commands = mailbox.withLock { box in
            let taken = box
            box.removeAll(keepingCapacity: true)
            return taken
        }
        for command in commands {
            switch command {
            case .add(let q, let done):
                let s: Int
                if let free = freeSlots.popLast() {
                    s = free
                } else {
                    slots.append(Slot())
                    s = slots.count - 1
                }
                slots[s] = Slot(key: q.key, device: q.device, fd: q.fd, counters: q.counters.pointer,
                                owner: q.counters, echo: q.mode == .echo, macOffset: q.macOffset ?? -1,
                                polled: false)
                do {
                    try epoll.add(q.fd, token: UInt64(s))
                    slots[s].polled = true
                    slotOfKey[q.key] = s
                    done.finish()
                } catch {
                    slots[s] = Slot()
                    freeSlots.append(s)
                    done.finish(error)
                }
            case .remove(let key, let done):
                if let s = slotOfKey.removeValue(forKey: key) {
                    if slots[s].polled { try? epoll.remove(slots[s].fd) }
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
