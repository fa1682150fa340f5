import CTunLinux

/// Wakes a thread that sleeps in a blocking `read()` of one fd, without ever losing the
/// wake-up. The sleeping thread arms the fd it reads; a kick (SIGURG to that thread) makes
/// the fd non-blocking from inside the thread's signal handler. A read already asleep is
/// restarted by the kernel and returns at once (EAGAIN, or a frame); a read the thread was
/// just about to start cannot block either, which a flag checked before `read()` could not
/// promise. The reader makes its fd blocking again once it has looked at why it was kicked.
public enum Kick {
    /// Installs the process-wide handler (idempotent). The handler restarts interrupted
    /// system calls, so threads that are never armed do not see EINTR from a kick.
    /// The corresponding C function is `sigaction(SIGURG)`.
    public static func install() throws(SyscallError) {
        let rc = mqt_kick_install()
        if rc != 0 { throw SyscallError(call: "sigaction(SIGURG)", errno: Errno(-rc)) }
    }

    /// Readies the calling thread to be kicked: threads inherit the signal mask of the thread
    /// that made them (libdispatch's threads block every signal), so it is unblocked here.
    /// Also disarms, which makes the thread's first touch of the armed-fd slot happen here
    /// and not inside the handler. The corresponding C function is `pthread_sigmask`.
    public static func prepareThread() throws(SyscallError) {
        let rc = mqt_kick_unblock()
        if rc != 0 { throw SyscallError(call: "pthread_sigmask(SIG_UNBLOCK, SIGURG)", errno: Errno(-rc)) }
        mqt_kick_arm(-1)
    }

    /// Arms `fd` for the calling thread: a kick makes it non-blocking. The caller must not let
    /// the fd be closed while it is armed (a kick would then touch whatever reuses the number).
    public static func arm(_ fd: Int32) { mqt_kick_arm(fd) }

    /// Disarms the calling thread: a late kick then does nothing.
    public static func disarm() { mqt_kick_arm(-1) }
}

extension NamedThread {
    /// Kicks the thread (see `Kick`). The thread must not have been joined.
    /// The corresponding C function is `pthread_kill(SIGURG)`.
    public func kick() {
        let rc = mqt_kick(handle)
        precondition(rc == 0, "pthread_kill: \(Errno(rc))")
    }
}

/// Sets or clears `O_NONBLOCK` on `fd` (its open file description, so every fd that shares it).
public func setNonBlocking(_ fd: Int32, _ on: Bool) throws(SyscallError) {
    let rc = mqt_set_nonblocking(fd, on ? 1 : 0)
    if rc != 0 { throw SyscallError(call: "fcntl(F_SETFL, O_NONBLOCK)", errno: Errno(-rc)) }
}
