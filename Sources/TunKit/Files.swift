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
        let fd = try retryingEINTR("open(\(tmp))") { open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode_t(mode)) }
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

    /// The whole file, or nil if it does not exist.
    public static func read(_ path: String) throws(SyscallError) -> [UInt8]? { try readWholeFile(path) }

    /// Moves a file aside (`rename(2)`), e.g. a corrupt state file kept for inspection.
    public static func move(_ from: String, to: String) throws(SyscallError) {
        _ = try retryingEINTR("rename(\(from), \(to))") { rename(from, to) }
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}

/// An exclusive advisory lock on a file (`flock`), held until `release()` or process exit,
/// so it is never left stale by a crash. The lock file itself stays.
public final class FileLock: Sendable {
    public let path: String
    private let fd: Int32

    /// Takes the lock or fails at once: EWOULDBLOCK means another process holds it.
    /// The corresponding C functions are `open(2)` and `flock(LOCK_EX | LOCK_NB)`.
    public init(path: String) throws(SyscallError) {
        self.path = path
        let fd = try retryingEINTR("open(\(path))") { open(path, O_RDWR | O_CREAT | O_CLOEXEC, mode_t(0o600)) }
        do throws(SyscallError) {
            _ = try retryingEINTR("flock(\(path))") { flock(fd, LOCK_EX | LOCK_NB) }
        } catch {
            closeFD(fd)
            throw error
        }
        self.fd = fd
    }

    public func release() { closeFD(fd) }
}
