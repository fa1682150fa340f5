#if canImport(Glibc)
import Glibc
#endif
import CTunLinux
import TunKit

/// Running the leased command in place of this one, with some fds inherited.
enum Process {
    /// Lets `fd` survive an exec (clears FD_CLOEXEC). The corresponding C call is
    /// `fcntl(F_SETFD)`.
    static func inherit(_ fd: Int32) throws(SyscallError) {
        let flags = try retryingEINTR("fcntl(F_GETFD)") { fcntl(fd, F_GETFD) }
        _ = try retryingEINTR("fcntl(F_SETFD)") { fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) }
    }

    /// Replaces this process with `argv[0]` (searched in PATH), the environment extended by
    /// `NAME=value` entries. Returns only on failure, with the errno.
    /// The corresponding C function is `execvpe(3)`.
    static func exec(_ argv: [String], addingEnvironment extra: [String] = []) -> Errno {
        precondition(!argv.isEmpty, "exec needs a program")
        var env: [String] = []
        var p = environ
        while let e = p.pointee {
            env.append(String(cString: e))
            p += 1
        }
        let names = Set(extra.map { $0.split(separator: "=", maxSplits: 1).first.map(String.init) ?? $0 })
        env = env.filter { !names.contains($0.split(separator: "=", maxSplits: 1).first.map(String.init) ?? $0) } + extra
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = env.map { strdup($0) } + [nil]
        let err = Errno(-mqt_execvpe(argv[0], cArgs, cEnv))
        cArgs.forEach { free($0) }
        cEnv.forEach { free($0) }
        return err
    }
}

/// Whether `fd` is a terminal.
func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }
