import Synchronization
import TunKit

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
    func setAction(key: UInt64, _ action: QueueAction, on worker: Int) {
        let done = Completion()
        workers[worker].post(.setAction(key: key, action, done))
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
