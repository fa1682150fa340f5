#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// Runs `body` until it stops failing with EINTR, and turns -1 into a `SyscallError`
/// naming `call`. Never used for `close`: a close interrupted on Linux has still closed.
@inline(__always)
public func retryingEINTR<T: FixedWidthInteger>(_ call: @autoclosure () -> String, _ body: () -> T) throws(SyscallError) -> T {
    while true {
        let rc = body()
        if rc != -1 { return rc }
        let err = Errno.current
        if err == .interrupted { continue }
        throw SyscallError(call: call(), errno: err)
    }
}

/// Closing an fd we own cannot fail in a way we can act on, except EBADF, which means
/// the fd was already closed or never ours: a bug, so it traps.
public func closeFD(_ fd: Int32) {
    let rc = Glibc.close(fd)
    if rc == -1 {
        let err = Errno.current
        precondition(err != .badFileDescriptor, "close(\(fd)): EBADF — fd closed twice or never owned")
    }
}

/// The owner of an fd the daemon opened for a moment (a duplicate to hand over): closed
/// exactly once, when the owner goes.
public struct OwnedFD: ~Copyable, Sendable {
    public let fd: Int32

    /// A new fd of the same open file as `fd`, close-on-exec.
    /// The corresponding C call is `fcntl(F_DUPFD_CLOEXEC)`.
    public init(duplicating fd: Int32) throws(SyscallError) {
        self.fd = try retryingEINTR("fcntl(F_DUPFD_CLOEXEC)") { fcntl(fd, F_DUPFD_CLOEXEC, 0) }
    }

    /// Takes ownership of an fd a call returned.
    public init(adopting fd: Int32) { self.fd = fd }

    deinit { closeFD(fd) }
}

/// The result of a packet-path read or write: a byte count, or the errno. No throwing and
/// no allocation, so the worker loop stays a plain loop.
public enum IOResult: Equatable, Sendable {
    case done(Int)
    case failed(Errno)
}

/// Reads one frame. The corresponding system call is `read(2)` (made directly, without
/// glibc's cancellation handling); EINTR is retried.
@inline(__always)
public func readFrame(_ fd: Int32, into buffer: UnsafeMutableRawPointer, capacity: Int) -> IOResult {
    while true {
        let n = mqt_read(fd, buffer, UInt(capacity))
        if n >= 0 { return .done(n) }
        if n == -Int(EINTR) { continue }
        return .failed(Errno(Int32(-n)))
    }
}

/// Writes one frame. The corresponding system call is `write(2)`; EINTR is retried.
@inline(__always)
public func writeFrame(_ fd: Int32, from buffer: UnsafeRawPointer, count: Int) -> IOResult {
    while true {
        let n = mqt_write(fd, buffer, UInt(count))
        if n >= 0 { return .done(n) }
        if n == -Int(EINTR) { continue }
        return .failed(Errno(Int32(-n)))
    }
}

/// Opens a file with O_CLOEXEC added.
public func openFile(_ path: String, flags: Int32) throws(SyscallError) -> Int32 {
    try retryingEINTR("open(\(path))") { Glibc.open(path, flags | O_CLOEXEC) }
}

/// Reads a whole small file (sysfs, procfs) as text. Returns nil if it does not exist.
public func readSmallFile(_ path: String) throws(SyscallError) -> String? {
    try Files.read(path).map { String(decoding: $0, as: UTF8.self) }
}

/// Reads a whole file's bytes. Returns nil if it (or, in sysfs, its device) does not exist.
func readWholeFile(_ path: String, noFollow: Bool = false) throws(SyscallError) -> [UInt8]? {
    let fd: Int32
    do {
        fd = try openFile(path, flags: O_RDONLY | (noFollow ? O_NOFOLLOW : 0))
    } catch where error.errno == .noSuchFile || error.errno == .noDevice {
        return nil
    }
    defer { closeFD(fd) }
    var bytes: [UInt8] = []
    let chunk = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 8)
    defer { chunk.deallocate() }
    while true {
        let n = try retryingEINTR("read(\(path))") { Glibc.read(fd, chunk, 4096) }
        if n == 0 { break }
        bytes.append(contentsOf: UnsafeRawBufferPointer(start: chunk, count: n))
    }
    return bytes
}

/// Writes a small file in one write (sysfs, procfs knobs).
public func writeSmallFile(_ path: String, _ text: String) throws(SyscallError) {
    let fd = try openFile(path, flags: O_WRONLY)
    defer { closeFD(fd) }
    let bytes = Array(text.utf8)
    _ = try retryingEINTR("write(\(path))") { bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } }
}
