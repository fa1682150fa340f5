#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

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

    /// Runs `body` on a thread of its own that has entered the namespace `netns` (the
    /// calling thread's namespace stays as it is); what `body` opens belongs to `netns`.
    /// The corresponding C function is `setns(CLONE_NEWNET)`.
    public static func run<T: Sendable>(in netns: Int32, _ body: @escaping @Sendable () throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        let box = ResultBox<T>()
        let thread = try NamedThread(name: "mqtapd-netns") {
            let rc = mqt_setns_net(netns)
            guard rc == 0 else {
                box.result = .failure(SyscallError(call: "setns(CLONE_NEWNET)", errno: Errno(-rc)))
                return
            }
            do throws(SyscallError) {
                box.result = .success(try body())
            } catch {
                box.result = .failure(error)
            }
        }
        thread.join()
        // SAFETY: written by the thread before it ended, read after the join.
        switch box.result! {
        case .success(let v): return v
        case .failure(let e): throw e
        }
    }

    private final class ResultBox<T>: @unchecked Sendable {
        // SAFETY (@unchecked): written once by the thread, read after it was joined.
        var result: Result<T, SyscallError>?
    }
}
