#if canImport(Glibc)
import Glibc
#endif

/// Signals delivered synchronously: blocked in every thread, then awaited with `sigwait`.
enum Signals {
    static let terminate = SIGTERM
    static let interrupt = SIGINT
    /// The terminal hung up: by default the end of the process; the daemon has no terminal
    /// and no file to reopen, so it only logs it.
    static let hangUp = SIGHUP

    /// Blocks `signals` in the calling thread and in every thread it starts afterwards (the
    /// mask is inherited), so only `wait` receives them. Call before starting any thread.
    static func block(_ signals: [Int32]) {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        // A write to a closed client socket must be an EPIPE error, not the end of the process.
        signal(SIGPIPE, SIG_IGN)
    }

    /// Waits for one of `signals` (blocked beforehand) and returns it.
    static func wait(_ signals: [Int32]) -> Int32 {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        var received: Int32 = 0
        while sigwait(&set, &received) != 0 {}
        return received
    }
}
