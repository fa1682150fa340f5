#if canImport(Glibc)
import Glibc
#endif
import CTunLinux
import Dispatch
import Synchronization

/// A named OS thread that runs one closure and is joined explicitly.
public final class NamedThread: Sendable {
    let handle: pthread_t

    private final class Start {
        let name: String
        let body: () -> Void
        init(name: String, body: @escaping () -> Void) { self.name = name; self.body = body }
    }

    /// Starts `body` on a new thread called `name` (the kernel keeps 15 characters).
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(SyscallError) {
        // SAFETY: the retained Start box is handed to the new thread, which takes it back
        // with takeRetainedValue exactly once; if pthread_create fails we release it here.
        let context = Unmanaged.passRetained(Start(name: name, body: body)).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, nil, { raw in
            // SAFETY: `raw` is the Start box passed retained above; nothing else consumes it.
            let start = Unmanaged<Start>.fromOpaque(raw!).takeRetainedValue()
            start.name.withCString { mqt_set_thread_name($0) }
            start.body()
            return nil
        }, context)
        if rc != 0 {
            // SAFETY: no thread was started, so nothing else will take the box back.
            Unmanaged<Start>.fromOpaque(context).release()
            throw SyscallError(call: "pthread_create", errno: Errno(rc))
        }
        handle = tid
    }

    /// Lets the thread end on its own: nothing will join it (its resources go when it ends).
    public func detach() {
        let rc = pthread_detach(handle)
        precondition(rc == 0, "pthread_detach: \(Errno(rc))")
    }

    /// Waits for the thread to finish.
    public func join() {
        let rc = pthread_join(handle, nil)
        precondition(rc == 0, "pthread_join: \(Errno(rc))")
    }
}

/// A named thread that runs `body` every `interval` seconds until stopped; `stop()` wakes it
/// at once (no waiting out the interval) and joins it.
public final class PeriodicThread: Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let thread = Mutex<NamedThread?>(nil)

    public init(name: String, every interval: Double, _ body: @escaping @Sendable () -> Void) throws(SyscallError) {
        let done = self.done
        let t = try NamedThread(name: name) {
            while done.wait(timeout: .now() + interval) == .timedOut { body() }
        }
        thread.withLock { $0 = t }
    }

    /// Stops and joins the thread. Idempotent.
    public func stop() {
        guard let t = thread.withLock({ t in
            defer { t = nil }
            return t
        }) else { return }
        done.signal()
        t.join()
    }
}

/// State under a mutex, with a condition to wait on until the state is what a waiter needs:
/// a wait ends when the change happens, not when a sleep loop next looks.
public final class Monitor<State: Sendable>: @unchecked Sendable {
    // SAFETY (@unchecked): `state` is read and written only between pthread_mutex_lock and
    // pthread_mutex_unlock of `mutex` (pthread_cond_wait gives the mutex back locked). The
    // mutex and condition are heap-allocated, so they never move while a thread uses them.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var state: State

    public init(_ initial: State) {
        state = initial
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        // Deadlines on CLOCK_MONOTONIC: a wall-clock step never stretches or cuts a wait.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    /// Runs `body` on the state under the mutex; every waiter then looks again.
    public func withLock<R>(_ body: (inout State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer {
            pthread_cond_broadcast(condition)
            pthread_mutex_unlock(mutex)
        }
        return try body(&state)
    }

    /// Blocks until `done` holds for the state, or `seconds` have passed (nil: no limit).
    /// True if it holds.
    @discardableResult
    public func wait(until done: (State) -> Bool, within seconds: Double? = nil) -> Bool {
        let deadline = seconds.map { Clock.monotonicNanoseconds() + UInt64(max(0, $0) * 1e9) }
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !done(state) {
            guard let deadline else {
                pthread_cond_wait(condition, mutex)
                continue
            }
            var until = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
            if pthread_cond_timedwait(condition, mutex, &until) == ETIMEDOUT { return done(state) }
        }
        return true
    }
}
