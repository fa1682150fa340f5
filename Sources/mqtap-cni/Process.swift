#if canImport(Glibc)
import Glibc
#endif
import CTunLinux
import TunKit

/// The delegated plugins (IPAM, `nsenter … ip`): run, fed, and waited for.
enum Process {
    /// A child that exits before reading all its input must not kill this process (SIGPIPE).
    static func ignoreBrokenPipe() { signal(SIGPIPE, SIG_IGN) }

    static func exit(_ status: Int32) -> Never { Glibc.exit(status) }

    /// The first `dir/name` in `path` this process may execute.
    static func executable(_ name: String, in path: [String]) -> String? {
        path.map { $0 + "/" + name }.first { access($0, X_OK) == 0 }
    }

    /// What a child process left: its exit status (128 + N for a signal) and its stdout.
    struct Outcome: Sendable {
        let status: Int32
        let output: [UInt8]
    }

    /// Runs `argv[0]` (a path, or a name searched in PATH) with `environment` as its whole
    /// environment, `input` on its stdin and our stderr as its own, and waits for it.
    /// The corresponding C functions are `posix_spawnp(3)` and `waitpid(2)`.
    static func run(_ argv: [String], environment: [String], input: [UInt8] = []) throws(SyscallError) -> Outcome {
        precondition(!argv.isEmpty, "run needs a program")
        var inPipe: [Int32] = [-1, -1]
        var outPipe: [Int32] = [-1, -1]
        var rc0 = mqt_pipe_cloexec(&inPipe)
        if rc0 < 0 { throw SyscallError(call: "pipe2", errno: Errno(-rc0)) }
        rc0 = mqt_pipe_cloexec(&outPipe)
        if rc0 < 0 {
            closeFD(inPipe[0]); closeFD(inPipe[1])
            throw SyscallError(call: "pipe2", errno: Errno(-rc0))
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // dup2 clears close-on-exec on the child's 0 and 1: only they cross the exec.
        posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = environment.map { strdup($0) } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, argv[0], &actions, nil, cArgs, cEnv)
        closeFD(inPipe[0])
        closeFD(outPipe[1])
        guard rc == 0 else {
            closeFD(inPipe[1]); closeFD(outPipe[0])
            throw SyscallError(call: "posix_spawnp(\(argv[0]))", errno: Errno(rc))
        }
        // The input is small (a CNI config): written whole before the output is read, as the
        // child reads all of its stdin first. A child that exits early makes the write fail
        // (EPIPE, with SIGPIPE ignored by the caller), which is no error here.
        var offset = 0
        while offset < input.count {
            let n = input[offset...].withUnsafeBytes { write(inPipe[1], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            offset += n
        }
        closeFD(inPipe[1])
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(outPipe[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            output += buffer[0..<n]
        }
        closeFD(outPipe[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import (macros).
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Outcome(status: code, output: output)
    }

    /// This process's environment, as `NAME=value` entries.
    static var environment: [String] {
        var env: [String] = []
        var p = environ
        while let e = p.pointee {
            env.append(String(cString: e))
            p += 1
        }
        return env
    }
}
