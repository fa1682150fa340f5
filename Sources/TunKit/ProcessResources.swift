#if canImport(Glibc)
import Glibc
#endif
import CTunLinux
import Synchronization

/// Facts about this process and machine that limits and leak checks need.
public enum ProcessResources {
    /// Open file descriptors of this process (entries of /proc/self/fd, the one kept to list
    /// them included: it is one of the process's fds for good).
    ///
    /// The directory is opened once and kept (rewound for each count), so counting needs no
    /// new fd: under EMFILE, when the answer matters most, it still counts. If it could never
    /// be opened, the last count made is the answer. Never negative.
    public static func openFileCount() -> Int {
        fdDirectory.withLock { state in
            if state.dir == nil { state.dir = opendir("/proc/self/fd") }
            guard let dir = state.dir else { return state.last }
            rewinddir(dir)
            var n = 0
            while let entry = readdir(dir) {
                let isDot = withUnsafeBytes(of: entry.pointee.d_name) { $0.first == UInt8(ascii: ".") }
                if !isDot { n += 1 }
            }
            state.last = n
            return state.last
        }
    }

    private struct FDDirectory: @unchecked Sendable {
        // SAFETY (@unchecked): the DIR is only used under the mutex, by one thread at a time.
        var dir: OpaquePointer?
        var last = 0
    }

    /// Opened on first use and kept for the life of the process (one fd).
    private static let fdDirectory = Mutex(FDDirectory())

    /// CPU time, memory and start time, as Prometheus' standard `process_*` metrics have them.
    public struct Usage: Sendable {
        public var cpuSeconds: Double
        public var residentBytes: UInt64
        public var virtualBytes: UInt64
        /// Seconds since the epoch.
        public var startTime: Double
    }

    /// This process's usage, from /proc/self/stat and /proc/stat; nil if they cannot be read.
    public static func usage() -> Usage? {
        guard let stat = try? readSmallFile("/proc/self/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        // Fields after the command name (which may hold spaces), from field 3 (state) on.
        let f = stat[stat.index(after: close)...].split(separator: " ")
        guard f.count > 22, let utime = Double(f[11]), let stime = Double(f[12]), let start = Double(f[19]),
              let vsize = UInt64(f[20]), let rss = UInt64(f[21]) else { return nil }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        guard let all = try? readSmallFile("/proc/stat"),
              let line = all.split(separator: "\n").first(where: { $0.hasPrefix("btime ") }),
              let boot = Double(line.dropFirst(6).trimmingWhitespace) else { return nil }
        return Usage(cpuSeconds: (utime + stime) / ticks, residentBytes: rss * page, virtualBytes: vsize,
                     startTime: boot + start / ticks)
    }

    /// The soft and hard `RLIMIT_NOFILE`.
    public static func fileLimit() -> (soft: UInt64, hard: UInt64) {
        var rl = rlimit()
        _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
        return (UInt64(rl.rlim_cur), UInt64(rl.rlim_max))
    }

    /// Sets the soft `RLIMIT_NOFILE`.
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
