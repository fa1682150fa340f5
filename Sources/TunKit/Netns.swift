#if canImport(Glibc)
import Glibc
#endif
import CTunLinux
import Dispatch
import Synchronization

/// Network namespaces, as far as the daemon needs them: a device moved into another
/// namespace (`ip link set DEV netns NS`) keeps working through its queue fds, but a new queue
/// must be opened from inside that namespace, or TUNSETIFF by name would make a new device of
/// that name in the daemon's own.
public enum Netns {
    /// The namespace the device of a tun fd lives in, as an fd of its own.
    /// The corresponding C call is `ioctl(TUNGETDEVNETNS)` (Linux 5.2 and later).
    public static func ofDevice(_ tunFD: Int32) throws(SyscallError) -> OwnedFD {
        let fd = try retryingEINTR("ioctl(TUNGETDEVNETNS)") { mqt_ioctl(tunFD, mqt_TUNGETDEVNETNS, nil) }
        return OwnedFD(adopting: fd)
    }

    /// As `ofDevice`, but nil on a kernel without TUNGETDEVNETNS (before 5.2: ENOTTY, or
    /// EINVAL), where the device is taken to be in the caller's namespace.
    public static func ofDeviceIfSupported(_ tunFD: Int32) throws(SyscallError) -> OwnedFD? {
        do {
            return try ofDevice(tunFD)
        } catch where error.errno == Errno(ENOTTY) || error.errno == .invalidArgument {
            return nil
        }
    }

    /// A namespace's identity: the inode of its fd (`/proc/PID/ns/net` shows the same).
    public static func inode(_ fd: Int32) throws(SyscallError) -> UInt64 {
        var st = stat()
        _ = try retryingEINTR("fstat(netns)") { fstat(fd, &st) }
        return UInt64(st.st_ino)
    }

    /// Where a device is: its namespace's inode, the name `ip netns` knows it by (a bind
    /// mount under /run/netns), and whether it is the daemon's own.
    public struct Place: Hashable, Sendable {
        public var inode: UInt64
        public var name: String?
        public var isOwn: Bool

        public init(inode: UInt64, name: String?, isOwn: Bool) {
            self.inode = inode
            self.name = name
            self.isOwn = isOwn
        }
    }

    /// The namespace the device of a tun fd lives in. The name is looked up only for a
    /// namespace other than the daemon's (whose own may have no name).
    public static func place(ofDevice tunFD: Int32) throws(SyscallError) -> Place {
        guard let ns = try ofDeviceIfSupported(tunFD) else {
            return Place(inode: try currentInode(), name: nil, isOwn: true)
        }
        let ino = try inode(ns.fd)
        let own = try currentInode() == ino
        return Place(inode: ino, name: own ? nil : name(ofInode: ino), isOwn: own)
    }

    /// The entry of /run/netns (where `ip netns add` bind-mounts namespaces) whose inode is
    /// `ino`, if any.
    public static func name(ofInode ino: UInt64) -> String? {
        guard let dir = opendir("/run/netns") else { return nil }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard name != ".", name != ".." else { continue }
            // A namespace bind mount is an nsfs inode: same inode on the same (nsfs) device.
            var st = stat()
            if stat("/run/netns/" + name, &st) == 0 && UInt64(st.st_ino) == ino && st.st_dev == nsfsDevice { return name }
        }
        return nil
    }

    /// Why a path is not a network namespace one can create devices in.
    public enum OpenError: Error, Sendable, Equatable {
        /// Nothing there.
        case missing
        /// Something there that is not a network namespace (the reason says what).
        case notNetns(String)
        case failed(SyscallError)
    }

    /// Where `spec` points: a path as given, or a bare name under /run/netns (`ip netns`).
    public static func path(_ spec: String) -> String { spec.contains("/") ? spec : "/run/netns/" + spec }

    /// Opens a network namespace by path (`/run/netns/NAME`, `/proc/PID/ns/net`, a bind mount
    /// a runtime made): an fd on nsfs whose namespace type is NET.
    /// The corresponding C calls are `open(2)`, `fstat(2)` and `ioctl(NS_GET_NSTYPE)`.
    public static func open(path: String) throws(OpenError) -> OwnedFD {
        let fd: Int32
        do {
            // Non-blocking: a FIFO (or anything else that would wait) is never waited on.
            fd = try openFile(path, flags: O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        } catch where error.errno == .noSuchFile {
            throw .missing
        } catch where error.errno == .isDirectory {
            throw .notNetns("it is a directory")
        } catch {
            throw .failed(error)
        }
        let owned = OwnedFD(adopting: fd)
        var st = stat()
        guard fstat(fd, &st) == 0, UInt64(st.st_dev) == nsfsDevice else {
            throw .notNetns("it is not a namespace file (nsfs)")
        }
        guard mqt_ns_is_net(fd) == 1 else { throw .notNetns("it is a namespace of another type") }
        return owned
    }

    /// A process's namespace file whose inode is `ino` (`/proc/PID/ns/net`), if any process is
    /// in it: how a namespace with no name under /run/netns is found again.
    public static func processPath(ofInode ino: UInt64) -> String? {
        guard let dir = opendir("/proc") else { return nil }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let first = name.utf8.first, first >= 48 && first <= 57 else { continue }
            var st = stat()
            let path = "/proc/" + name + "/ns/net"
            if stat(path, &st) == 0 && UInt64(st.st_ino) == ino { return path }
        }
        return nil
    }

    /// The device number of nsfs, where every namespace inode lives.
    private static var nsfsDevice: UInt64 {
        var st = stat()
        return stat("/proc/self/ns/net", &st) == 0 ? UInt64(st.st_dev) : 0
    }

    /// The calling thread's namespace's inode.
    public static func currentInode() throws(SyscallError) -> UInt64 {
        var st = stat()
        _ = try retryingEINTR("stat(/proc/thread-self/ns/net)") { stat("/proc/thread-self/ns/net", &st) }
        return UInt64(st.st_ino)
    }

    /// Runs `body` inside the namespace `netns` (the calling thread's namespace stays as it
    /// is); what `body` opens belongs to `netns`. In the caller's own namespace it runs at
    /// once; elsewhere on that namespace's helper thread (`NetnsHelpers`), kept between calls.
    /// `body` must not itself run something in another namespace.
    public static func run<T: Sendable>(in netns: Int32, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        let target = try inode(netns)
        if try currentInode() == target { return try body() }
        return try NetnsHelpers.shared.run(inode: target, netns: netns, body)
    }
}

/// The threads that run steps in other namespaces: one per namespace (by inode), made on its
/// first call, kept while calls come and retired after `idleSeconds` without. Between calls a
/// helper is back in the namespace it started in (the daemon's), so it never keeps alive a
/// namespace everyone else let go of: `ip netns del` still ends it, and the devices in it.
final class NetnsHelpers: Sendable {
    static let shared = NetnsHelpers()
    static let idleSeconds = 10.0

    /// Runs the step (nil), or fails it without running (the helper cannot serve).
    typealias Job = @Sendable (SyscallError?) -> Void

    private final class Helper: Sendable {
        let jobs = Mutex<[Job]>([])
        let wake = DispatchSemaphore(value: 0)
    }

    private let helpers = Mutex<[UInt64: Helper]>([:])

    func run<T: Sendable>(inode: UInt64, netns: Int32, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        let box = ResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        // `netns` stays open meanwhile: the caller waits for the job.
        try submit(inode: inode) { refused in
            defer { done.signal() }
            if let refused { return box.result = .failure(refused) }
            let rc = mqt_setns_net(netns)
            guard rc == 0 else { return box.result = .failure(SyscallError(call: "setns(CLONE_NEWNET)", errno: Errno(-rc))) }
            do throws(SyscallError) {
                box.result = .success(try body())
            } catch {
                box.result = .failure(error)
            }
        }
        done.wait()
        // SAFETY: written by the helper before it signalled `done`, read after the wait.
        switch box.result! {
        case .success(let v): return v
        case .failure(let e): throw e
        }
    }

    /// Queues `job` on the namespace's helper, starting one if there is none. Under the
    /// registry's lock, so a helper that retires never leaves a job behind.
    private func submit(inode: UInt64, _ job: @escaping Job) throws(SyscallError) {
        try helpers.withLock { (all) throws(SyscallError) in
            let h = all[inode] ?? Helper()
            if all[inode] == nil {
                let thread = try NamedThread(name: "mqtapd-netns") { [self] in serve(h, inode: inode) }
                thread.detach()
                all[inode] = h
            }
            h.jobs.withLock { $0.append(job) }
            h.wake.signal()
        }
    }

    /// A helper's loop: each job enters its namespace, and the helper goes back to its own
    /// after it. One that cannot go back (or cannot tell where that is) fails what it has and
    /// retires.
    private func serve(_ h: Helper, inode: UInt64) {
        let home: Int32
        do {
            home = try openFile("/proc/thread-self/ns/net", flags: O_RDONLY | O_CLOEXEC)
        } catch {
            return retire(h, inode: inode, failing: error)
        }
        defer { close(home) }
        while true {
            if h.wake.wait(timeout: .now() + Self.idleSeconds) == .timedOut {
                let idle = helpers.withLock { all -> Bool in
                    guard h.jobs.withLock({ $0.isEmpty }) else { return false }
                    all[inode] = nil
                    return true
                }
                if idle { return }
                continue
            }
            guard let job = h.jobs.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else { continue }
            job(nil)
            let rc = mqt_setns_net(home)
            if rc != 0 { return retire(h, inode: inode, failing: SyscallError(call: "setns(CLONE_NEWNET)", errno: Errno(-rc))) }
        }
    }

    /// Takes the helper out of the registry and fails what it still has queued.
    private func retire(_ h: Helper, inode: UInt64, failing error: SyscallError) {
        let left = helpers.withLock { all -> [Job] in
            if all[inode] === h { all[inode] = nil }
            return h.jobs.withLock { jobs in
                defer { jobs = [] }
                return jobs
            }
        }
        for job in left { job(error) }
    }

    private final class ResultBox<T>: @unchecked Sendable {
        // SAFETY (@unchecked): written once by the helper before it signals, read after.
        var result: Result<T, SyscallError>?
    }
}
