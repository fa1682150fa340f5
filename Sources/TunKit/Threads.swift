#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// A named OS thread that runs one closure and is joined explicitly.
public final class NamedThread: Sendable {
    let handle: pthread_t

    private final class Start {
        let name: String
        let body: () -> Void
        init(name: String, body: @escaping () -> Void) { self.name = name; self.body = body }
    }

    /// Starts `body` on a new thread called `name` (the kernel keeps 15 characters).
    /// The corresponding C functions are `pthread_create` and `pthread_setname_np`.
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

    /// Waits for the thread to finish. The corresponding C function is `pthread_join`.
    public func join() {
        let rc = pthread_join(handle, nil)
        precondition(rc == 0, "pthread_join: \(Errno(rc))")
    }
}

/// Facts about this process and machine that limits and leak checks need.
public enum ProcessResources {
    /// Open file descriptors of this process (entries of /proc/self/fd, without the one
    /// used to list them).
    public static func openFileCount() -> Int {
        guard let dir = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(dir) }
        var n = 0
        while let entry = readdir(dir) {
            let isDot = withUnsafeBytes(of: entry.pointee.d_name) { $0.first == UInt8(ascii: ".") }
            if !isDot { n += 1 }
        }
        return n - 1
    }

    /// The soft and hard `RLIMIT_NOFILE`. The corresponding C function is `getrlimit`.
    public static func fileLimit() -> (soft: UInt64, hard: UInt64) {
        var rl = rlimit()
        _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
        return (UInt64(rl.rlim_cur), UInt64(rl.rlim_max))
    }

    /// Sets the soft `RLIMIT_NOFILE`. The corresponding C function is `setrlimit`.
    public static func setFileLimit(soft: UInt64) throws(SyscallError) {
        var rl = rlimit()
        _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
        rl.rlim_cur = rlim_t(soft)
        _ = try retryingEINTR("setrlimit(RLIMIT_NOFILE)") { setrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl) }
    }

    /// Online CPUs. The corresponding C function is `sysconf(_SC_NPROCESSORS_ONLN)`.
    public static func onlineCPUs() -> Int {
        max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    }

    /// Whether this process runs as root (effective uid 0).
    public static var isRoot: Bool { geteuid() == 0 }

    /// Whether `/dev/net/tun` can be opened read-write by this process.
    public static var canOpenTun: Bool { access(Tun.devicePath, R_OK | W_OK) == 0 }
}
