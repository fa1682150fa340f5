import TunKit

/// A worker's note that reads or writes on a queue failed: at most one per queue per second
/// (`suppressed` counts the failures in between), so a failing queue cannot flood the log.
struct ErrorReport: Sendable {
    let errno: Errno
    let write: Bool
    let suppressed: UInt64
}

/// One worker thread: an epoll loop over the queue fds it owns and its mailbox's doorbell.
///
/// A worker that owns exactly one queue reads it with blocking reads instead (`solo`): one
/// system call per frame, sleeping inside read() as a plain C receiver does. Through epoll
/// every wake-up costs an epoll_wait and a read that ends in EAGAIN on top of the frames,
/// about 10% more CPU per frame at one queue (bench/RESULTS.md). Commands reach a solo worker
/// by a kick (see `Mailbox`), which cannot be lost between its check and its read.
final class Worker: @unchecked Sendable {
    // SAFETY (@unchecked): `table`, `frame` and `events` are touched only by the worker
    // thread (from `run`); the control path reaches the worker only through `mailbox` (a
    // Sendable type) and a kick, and reads `thread` only after `start` has set it (the pool
    // is not shared before every worker has started).
    let index: Int
    private let epoll: Epoll
    private let mailbox: Mailbox
    private let onGone: @Sendable (UInt64) -> Void
    private let onErrors: @Sendable (UInt64, UInt64, ErrorReport) -> Void
    private var thread: NamedThread?

    /// What one read of a queue came to.
    private enum ReadOutcome {
        case frame, empty, gone, failed
    }

    // Only the worker thread touches the table, so the dynamic exclusivity checks Swift would
    // make on every packet-path access are skipped.
    @exclusivity(unchecked) private var table = SlotTable()
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
        // Each owner closes its own fd if a later step throws.
        let epoll = try Epoll()
        let mailbox = try Mailbox()
        try epoll.add(mailbox.bell.fd, token: Self.bellToken)
        self.epoll = epoll
        self.mailbox = mailbox
        frame = .allocate(byteCount: Self.frameCapacity, alignment: 64)
    }

    deinit { frame.deallocate() }

    func start() throws(SyscallError) {
        thread = try NamedThread(name: "mqtapd-w\(index)") { [self] in run() }
    }

    func join() { thread?.join() }

    func post(_ command: WorkerCommand) {
        mailbox.post(command) { thread?.kick() }
    }

    private func run() {
        do {
            try Kick.prepareThread()
        } catch {
            preconditionFailure("worker \(index): \(error)")
        }
        var running = true
        while running {
            // A shared file's O_NONBLOCK is its holder's too: such a queue stays in epoll.
            if let only = table.onlyPolled, !table[only].shared, !mailbox.hasPending {
                solo(only)
                if mailbox.hasPending { running = runCommands() }
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
                guard table.isPolled(s) else { continue }
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
        let fd = table[s].fd
        // Out of the epoll set while solo, not merely muted: a watched fd costs the sender of
        // every frame an epoll callback, which slowed the generator in bench by ~10%. It goes
        // back in when a second queue comes (`add`), where a failure can be reported.
        if table[s].watched {
            try? epoll.remove(fd)
            table[s].watched = false
        }
        do {
            try setNonBlocking(fd, false)
        } catch {
            preconditionFailure("worker \(index): \(error) on a queue fd it owns")
        }
        // SAFETY: the fd stays open while armed: the control path closes a queue's fd only
        // after the worker has completed its `remove`, which runs after this returns.
        mailbox.enterSolo(fd)
        var outcome = ReadOutcome.frame
        while case .frame = outcome, !mailbox.hasPending {
            outcome = readOne(s)
        }
        mailbox.leaveSolo()
        if case .gone = outcome { lose(s) }
    }

    /// Puts a queue fd in the epoll set, non-blocking (a solo read or a kick may have left it
    /// either way).
    private func watch(_ s: Int) throws(SyscallError) {
        try setNonBlocking(table[s].fd, true)
        try epoll.add(table[s].fd, token: UInt64(s))
        table[s].watched = true
    }

    /// One read of a queue, the frame counted and handled by the queue's action as it
    /// arrives, so the counters are current even when the next read sleeps. The packet path:
    /// no lock, no allocation.
    @inline(__always)
    private func readOne(_ s: Int) -> ReadOutcome {
        // Read once per frame: a slot is plain values, so this copy retains nothing.
        let slot = table[s]
        let counters = slot.counters!
        switch readFrame(slot.fd, into: frame, capacity: Self.frameCapacity) {
        case .done(0):
            // End of file: tun never returns it; a closed peer (a vanished queue) does.
            return .gone
        case .done(let n):
            counters.received(n - slot.headerBytes)
            switch slot.kind {
            case .sink:
                break
            case .echo:
                let m = slot.macOffset
                if m >= 0 && n >= m + 12 { swapMACs(frame + m) }
                if writeOut(s, slot.fd, n) {
                    counters.sent(n - slot.headerBytes)
                } else {
                    counters.writeFailed()
                }
            case .forward:
                forward(s, slot, n, counters)
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
                counters.readFailed()
                noteError(s, e, write: false)
                return .failed
            }
        }
    }

    /// Writes the frame buffer's first `n` bytes, unchanged, into the peer's queue with this
    /// queue's index modulo the peer's count; counted on that queue's tx, or as dropped here.
    @inline(__always)
    private func forward(_ s: Int, _ slot: SlotTable.Slot, _ n: Int, _ counters: CounterBlock.Writer) {
        let count = slot.targetCount
        guard count > 0, let fds = slot.targetFDs, let writers = slot.targetWriters else {
            counters.dropped()
            return
        }
        let i = slot.index % count
        // SAFETY: the fds and writers belong to the slot's target, which the table keeps alive
        // (SlotTable.Owners) and which owns a duplicate of each fd: none can be closed under
        // this write.
        if writeOut(s, fds[i], n) {
            writers[i].sent(n - slot.headerBytes)
        } else {
            counters.dropped()
        }
    }

    /// One write of the frame buffer's first `n` bytes; a failure (or a short write) is
    /// reported, rate-limited, against slot `s`.
    @inline(__always)
    private func writeOut(_ s: Int, _ fd: Int32, _ n: Int) -> Bool {
        switch writeFrame(fd, from: frame, count: n) {
        case .done(let w) where w == n:
            return true
        case .done:
            noteError(s, .ioError, write: true)
        case .failed(let e):
            noteError(s, e, write: true)
        }
        return false
    }

    /// Off the fast path (only after a failure): report at most once a second per queue.
    private func noteError(_ s: Int, _ errno: Errno, write: Bool) {
        table[s].unreported &+= 1
        let now = Clock.monotonicNanoseconds()
        guard now &- table[s].lastReport >= 1_000_000_000 else { return }
        onErrors(table[s].device, table[s].key, ErrorReport(errno: errno, write: write, suppressed: table[s].unreported &- 1))
        table[s].lastReport = now
        table[s].unreported = 0
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
        if table[s].watched { try? epoll.remove(table[s].fd) }
        table[s].watched = false
        table.stopPolling(s)
        onGone(table[s].device)
    }

    /// Runs waiting commands; false once told to stop.
    private func runCommands() -> Bool {
        for command in mailbox.take() {
            switch command {
            case .add(let q, let done):
                done.finish(add(q))
            case .remove(let key, let done):
                if let old = table.remove(key: key), old.watched { try? epoll.remove(old.fd) }
                done.finish()
            case .setAction(let key, let action, let done):
                if let s = table.slot(key: key) { table.setAction(s, action) }
                done.finish()
            case .stop:
                return false
            }
        }
        return true
    }

    /// Starts reading `q`; the error, if it cannot (the worker then stays as it was).
    private func add(_ q: PolledQueue) -> SyscallError? {
        // A solo queue goes back into the epoll set first; if it cannot, the new queue is
        // refused.
        if let only = table.onlyPolled, !table[only].watched {
            do { try watch(only) } catch { return error }
        }
        let s = table.insert(q)
        do {
            try watch(s)
        } catch {
            table.discard(s)
            return error
        }
        table.startPolling(s)
        return nil
    }
}
