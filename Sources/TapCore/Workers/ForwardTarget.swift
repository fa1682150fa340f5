import TunKit

/// Where a forwarding device's workers write: the peer's queues that take frames now
/// (attached, not leased), in id order. The target owns a duplicate of each queue's fd, so a
/// worker can never write to an fd the peer has closed or to a number reused since: the peer's
/// queue lives on (in the kernel, too) until the last worker holding this target has let go of
/// it, which the manager waits for before it answers the change. Immutable once made.
final class ForwardTarget: @unchecked Sendable {
    // SAFETY (@unchecked): everything is set in init and never changed; the buffers are freed
    // in deinit, after the last worker let go of the target.
    /// The peer queues' keys, to tell whether the target must change.
    let keys: [UInt64]
    /// Raw fds and counter writers for the packet path, valid while the target lives.
    let fds: UnsafeMutableBufferPointer<Int32>
    let writers: UnsafeMutableBufferPointer<CounterBlock.Writer>
    private let files: [OwnedFDBox]
    private let blocks: [CounterBlock]

    struct Queue {
        let key: UInt64
        let file: OwnedFDBox
        let counters: CounterBlock
    }

    init(_ queues: [Queue]) {
        keys = queues.map(\.key)
        files = queues.map(\.file)
        blocks = queues.map(\.counters)
        fds = .allocate(capacity: max(queues.count, 1))
        writers = .allocate(capacity: max(queues.count, 1))
        for (i, q) in queues.enumerated() {
            fds[i] = q.file.fd
            writers.baseAddress!.advanced(by: i).initialize(to: q.counters.writer)
        }
    }

    deinit {
        fds.deallocate()
        writers.deallocate()
        for f in files { f.close() }
    }

    var count: Int { keys.count }
}
