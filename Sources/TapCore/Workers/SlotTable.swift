import TunKit

/// A worker's queues, by slot index (the epoll token) and by key (how commands name them).
/// Only the worker's thread touches it.
struct SlotTable {
    enum Kind { case sink, echo, forward }

    /// What the packet path reads: plain values and raw pointers only, so reading a slot
    /// touches no reference count. The objects the pointers point into are kept alive
    /// beside it, in `Owners`.
    struct Slot {
        var key: UInt64 = 0
        var device: UInt64 = 0
        /// Borrowed from the queue's owner, which keeps it open until the slot is removed.
        var fd: Int32 = -1
        /// Valid while the slot's `Owners.counters` keeps the block.
        var counters = CounterBlock.Writer?.none
        /// The action as plain fields: which one, the echo's MAC offset (-1: none), and the
        /// forward target's raw fds and writers (valid while `Owners.target` keeps them).
        var kind = Kind.sink
        var macOffset = -1
        var targetFDs: UnsafeMutablePointer<Int32>?
        var targetWriters: UnsafeMutablePointer<CounterBlock.Writer>?
        var targetCount = 0
        var index = 0
        var headerBytes = 0
        /// The worker reads this queue.
        var polled = false
        /// The fd is in the epoll set (a solo queue is not).
        var watched = false
        /// Its open file was handed out: never switched to blocking reads.
        var shared = false
        /// Rate limit of error reports: when the last went out, and failures since.
        var lastReport: UInt64 = 0
        var unreported: UInt64 = 0
    }

    /// What keeps a slot's pointers valid: its counter block and its forward target.
    struct Owners {
        var counters: CounterBlock?
        var target: ForwardTarget?
    }

    private(set) var slots: [Slot] = []
    /// Parallel to `slots`; touched only when a slot is set up, changed or freed.
    private var owners: [Owners] = []
    private var free: [Int] = []
    private var byKey: [UInt64: Int] = [:]
    /// Slots being read; kept as a count because the loop looks at it on every turn.
    private(set) var polledCount = 0

    @inline(__always) subscript(s: Int) -> Slot {
        get { slots[s] }
        _modify { yield &slots[s] }
    }

    /// Whether `s` names a slot that is being read (an epoll token may be stale).
    @inline(__always) func isPolled(_ s: Int) -> Bool { s < slots.count && slots[s].polled }

    /// The slot of the only polled queue, when there is exactly one.
    var onlyPolled: Int? { polledCount == 1 ? slots.firstIndex(where: \.polled) : nil }

    /// A slot for `q`, not yet polled.
    mutating func insert(_ q: PolledQueue) -> Int {
        let s: Int
        if let f = free.popLast() {
            s = f
        } else {
            slots.append(Slot())
            owners.append(Owners())
            s = slots.count - 1
        }
        slots[s] = Slot(key: q.key, device: q.device, fd: q.fd, counters: q.counters.writer,
                        index: q.index, headerBytes: q.headerBytes, shared: q.shared)
        owners[s] = Owners(counters: q.counters)
        setAction(s, q.action)
        return s
    }

    /// Unpacks an action into the slot's plain fields (the old target is released here).
    mutating func setAction(_ s: Int, _ action: QueueAction) {
        owners[s].target = nil
        slots[s].targetFDs = nil
        slots[s].targetWriters = nil
        slots[s].targetCount = 0
        slots[s].macOffset = -1
        switch action {
        case .sink:
            slots[s].kind = .sink
        case .echo(let m):
            slots[s].kind = .echo
            slots[s].macOffset = m ?? -1
        case .forward(let t):
            slots[s].kind = .forward
            owners[s].target = t
            slots[s].targetFDs = t.fds.baseAddress
            slots[s].targetWriters = t.writers.baseAddress
            slots[s].targetCount = t.count
        }
    }

    /// Marks a slot as read (after its fd is watched or it goes solo).
    mutating func startPolling(_ s: Int) {
        slots[s].polled = true
        polledCount += 1
        byKey[slots[s].key] = s
    }

    /// Stops reading a slot but keeps it (a vanished queue, until the control path removes it).
    mutating func stopPolling(_ s: Int) {
        guard slots[s].polled else { return }
        slots[s].polled = false
        polledCount -= 1
    }

    /// Frees a slot that was inserted but never polled.
    mutating func discard(_ s: Int) {
        slots[s] = Slot()
        owners[s] = Owners()
        free.append(s)
    }

    func slot(key: UInt64) -> Int? { byKey[key] }

    /// Forgets the slot of `key`; returns it as it was, for the caller to unwatch its fd.
    mutating func remove(key: UInt64) -> Slot? {
        guard let s = byKey.removeValue(forKey: key) else { return nil }
        let old = slots[s]
        if old.polled { polledCount -= 1 }
        slots[s] = Slot()
        owners[s] = Owners()
        free.append(s)
        return old
    }
}
