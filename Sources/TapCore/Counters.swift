import CCounters

/// One queue's counter block, read lock-free by anyone: two cache lines, one per kind of
/// writer. The rx, error and dropped counters (the first line) are written only by the
/// queue's worker (relaxed stores, no read-modify-write needed with a single writer); the tx
/// counters (the second line) count what is written into the queue by whoever writes it (the
/// queue's worker echoing, other devices' workers forwarding), with atomic adds. The only
/// code that touches `mqt_counters`.
public final class CounterBlock: @unchecked Sendable {
    // SAFETY (@unchecked): the memory is written only through `Writer` by the one worker
    // that owns the queue, and read only through `read()`; both are 64-bit relaxed atomics,
    // so readers never see a torn value and never race on the line.
    private let pointer: UnsafeMutablePointer<mqt_counters>

    public init() {
        // Aligned to 64 bytes and 128 bytes long: each block's two lines are its own.
        // SAFETY: fresh raw memory of the struct's size, bound once to it and initialised
        // right below; freed in deinit, after the last worker that wrote it let go of it.
        pointer = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<mqt_counters>.size, alignment: 64)
            .bindMemory(to: mqt_counters.self, capacity: 1)
        pointer.initialize(to: mqt_counters())
    }

    deinit { pointer.deallocate() }

    /// A consistent-per-field snapshot (fields are read one by one, not as a transaction).
    public func read() -> CounterValues {
        var v = CounterValues()
        v.rxPackets = mqt_counter_load(&pointer.pointee.rx_packets)
        v.rxBytes = mqt_counter_load(&pointer.pointee.rx_bytes)
        v.txPackets = mqt_counter_load(&pointer.pointee.tx_packets)
        v.txBytes = mqt_counter_load(&pointer.pointee.tx_bytes)
        v.rxErrors = mqt_counter_load(&pointer.pointee.rx_errors)
        v.txErrors = mqt_counter_load(&pointer.pointee.tx_errors)
        v.dropped = mqt_counter_load(&pointer.pointee.dropped)
        return v
    }

    /// The address, for the test that checks each block has a cache line of its own.
    public var address: UInt { UInt(bitPattern: pointer) }

    /// The writer side, for the queue's one worker: a plain pointer, so the packet path
    /// touches no reference count. The worker keeps the block alive while it holds this.
    var writer: Writer { Writer(pointer) }

    /// Adds to one block's counters: the queue's worker (all of them), and workers that forward
    /// into the queue (its tx counters only).
    struct Writer {
        private let p: UnsafeMutablePointer<mqt_counters>

        fileprivate init(_ p: UnsafeMutablePointer<mqt_counters>) { self.p = p }

        /// A frame of `bytes` read from the queue.
        @inline(__always) func received(_ bytes: Int) {
            mqt_counter_add(&p.pointee.rx_packets, 1)
            mqt_counter_add(&p.pointee.rx_bytes, UInt64(bytes))
        }

        /// A frame of `bytes` written into the queue (by any worker: atomic).
        @inline(__always) func sent(_ bytes: Int) {
            mqt_counter_add_shared(&p.pointee.tx_packets, 1)
            mqt_counter_add_shared(&p.pointee.tx_bytes, UInt64(bytes))
        }

        @inline(__always) func readFailed() { mqt_counter_add(&p.pointee.rx_errors, 1) }
        @inline(__always) func writeFailed() { mqt_counter_add(&p.pointee.tx_errors, 1) }
        /// A frame read from this queue that could not be forwarded.
        @inline(__always) func dropped() { mqt_counter_add(&p.pointee.dropped, 1) }
    }
}
