#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// Durable files: the daemon's state file and its single-instance locks.
public enum Files {
    /// Replaces `path` with `bytes` so that a crash at any moment leaves either the old file
    /// or the new one, never a mix: write a temporary file, fsync it, rename it over `path`,
    /// fsync the directory (so the rename itself survives a power cut).
    public static func writeAtomically(_ path: String, _ bytes: [UInt8], mode: UInt32 = 0o600) throws(SyscallError) {
        let tmp = path + ".tmp"
        // A new file, never one found there: O_EXCL refuses whatever is at the path, a planted
        // symlink included (so a root write is never redirected). A temporary file left by a
        // crash is removed first; unlink removes a symlink itself, not its target. The rename
        // below replaces a symlink at `path` itself, too.
        _ = unlink(tmp)
        let fd = try retryingEINTR("open(\(tmp))") {
            open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode_t(mode))
        }
        do throws(SyscallError) {
            var offset = 0
            while offset < bytes.count {
                let n = try retryingEINTR("write(\(tmp))") {
                    bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
                }
                offset += n
            }
            _ = try retryingEINTR("fsync(\(tmp))") { fsync(fd) }
        } catch {
            closeFD(fd)
            _ = unlink(tmp)
            throw error
        }
        closeFD(fd)
        do throws(SyscallError) {
            _ = try retryingEINTR("rename(\(tmp), \(path))") { rename(tmp, path) }
        } catch {
            _ = unlink(tmp)
            throw error
        }
        let dir = directory(of: path)
        let dfd = try retryingEINTR("open(\(dir))") { open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        defer { closeFD(dfd) }
        _ = try retryingEINTR("fsync(\(dir))") { fsync(dfd) }
    }

    /// The whole file, or nil if it does not exist. With `followingLinks` false a symlink at
    /// `path` fails (ELOOP): for the daemon's own files, which are never links (a token file
    /// may be one: Kubernetes mounts secrets as links).
    public static func read(_ path: String, followingLinks: Bool = true) throws(SyscallError) -> [UInt8]? {
        try readWholeFile(path, noFollow: !followingLinks)
    }

    /// Why a directory the daemon keeps state in is unsafe, or nil if it is not: it must be
    /// a directory owned by this process's user and writable by no one
    /// else, or another user could plant files or links in it for root to write through.
    public static func unsafeDirectoryReason(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0 else { return "cannot stat it: \(Errno.current.message)" }
        guard st.st_mode & S_IFMT == S_IFDIR else { return "it is not a directory" }
        guard st.st_uid == geteuid() else { return "it is owned by uid \(st.st_uid), not by this process's uid \(geteuid())" }
        guard st.st_mode & 0o022 == 0 else {
            return "it is writable by its group or by others (mode 0\(String(UInt32(st.st_mode) & 0o7777, radix: 8)))"
        }
        return nil
    }

    /// Moves a file aside (`rename(2)`), e.g. a corrupt state file kept for inspection.
    public static func move(_ from: String, to: String) throws(SyscallError) {
        _ = try retryingEINTR("rename(\(from), \(to))") { rename(from, to) }
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// A file's permission bits (`st_mode & 0o7777`).
    public static func permissions(_ path: String) throws(SyscallError) -> UInt32 {
        var st = stat()
        _ = try retryingEINTR("stat(\(path))") { stat(path, &st) }
        return UInt32(st.st_mode) & 0o7777
    }

    /// Gives `path` to `uid`:`gid`.
    public static func setOwner(_ path: String, uid: UInt32, gid: UInt32) throws(SyscallError) {
        _ = try retryingEINTR("chown(\(path))") { chown(path, uid_t(uid), gid_t(gid)) }
    }

    /// The id of the group called `name`, nil if there is none.
    /// The corresponding C function is `getgrnam_r(3)`.
    public static func groupID(_ name: String) -> UInt32? {
        var group = group()
        var result: UnsafeMutablePointer<group>?
        var buffer = [CChar](repeating: 0, count: 16384)
        let rc = getgrnam_r(name, &group, &buffer, buffer.count, &result)
        guard rc == 0, result != nil else { return nil }
        return UInt32(group.gr_gid)
    }

    /// The id of the user called `name`, nil if there is none.
    /// The corresponding C function is `getpwnam_r(3)`.
    public static func userID(_ name: String) -> UInt32? {
        var user = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16384)
        let rc = getpwnam_r(name, &user, &buffer, buffer.count, &result)
        guard rc == 0, result != nil else { return nil }
        return UInt32(user.pw_uid)
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}

/// An exclusive advisory lock on a file (`flock`), and the owner of its fd: held until the
/// owner goes (`release()` or the end of its scope) or the process exits, so a crash never
/// leaves it stale. Not copyable: it is released exactly once. The lock file itself stays.
public struct FileLock: ~Copyable, Sendable {
    public let path: String
    private let fd: Int32

    /// Takes the lock or fails at once: EWOULDBLOCK means another process holds it.
    /// The corresponding C functions are `open(2)` and `flock(LOCK_EX | LOCK_NB)`.
    public init(path: String) throws(SyscallError) {
        self.path = path
        // O_NOFOLLOW: a lock file is never a link, so one planted there is not written through.
        let fd = try retryingEINTR("open(\(path))") { open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, mode_t(0o600)) }
        do throws(SyscallError) {
            _ = try retryingEINTR("flock(\(path))") { flock(fd, LOCK_EX | LOCK_NB) }
        } catch {
            closeFD(fd)
            throw error
        }
        self.fd = fd
    }

    /// Releases the lock now (closing its fd).
    public consuming func release() {}

    /// Removes the lock file, then releases the lock: for a lock whose file should not outlive
    /// a clean stop.
    public consuming func releaseRemovingFile() {
        _ = unlink(path)
    }

    deinit { closeFD(fd) }
}

/// `mkdir -p` with mode 0755 for directories it creates.
public func makeDirectories(_ path: String) throws(SyscallError) {
    var current = path.hasPrefix("/") ? "" : "."
    for part in path.split(separator: "/") {
        current += "/" + part
        if mkdir(current, 0o755) == -1 && errno != EEXIST {
            throw SyscallError(call: "mkdir(\(current))", errno: Errno.current)
        }
    }
}

/// Removes a file; a missing file is not an error.
public func removeFile(_ path: String) {
    _ = unlink(path)
}
