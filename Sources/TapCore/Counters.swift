import CCounters

/// One queue's counter block: one cache line, written only by the queue's worker (relaxed
/// stores, no read-modify-write needed with a single writer) and read lock-free by anyone.
public final class CounterBlock: @unchecked Sendable {
    // SAFETY (@unchecked): the memory is written only through `mqt_counter_add` by the one
    // worker that owns the queue, and read only through `mqt_counter_load`; both are
    // 64-bit relaxed atomics, so readers never see a torn value and never race on the line.
    let pointer: UnsafeMutablePointer<mqt_counters>

    public init() {
        // Aligned to 64 bytes and 64 bytes long: each block is a cache line of its own.
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
        return v
    }

    /// The address, for the test that checks each block has a cache line of its own.
    public var address: UInt { UInt(bitPattern: pointer) }
}
