#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// An errno value that keeps its name, so errors can say `E2BIG` rather than 7.
///
/// Catch it by name: `catch let e as SyscallError where e.errno == .tooBig`.
public struct Errno: Error, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32

    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    /// The symbolic name (`"EMFILE"`); `"E<number>"` for a number glibc does not know.
    public var name: String {
        if let p = mqt_errno_name(rawValue) { return String(cString: p) }
        return "E\(rawValue)"
    }

    /// The C library's message for the number ("Too many open files").
    public var message: String { String(cString: strerror(rawValue)) }

    public var description: String { name }

    /// The calling thread's current errno.
    static var current: Errno { Errno(errno) }

    public static let notPermitted = Errno(EPERM)
    public static let noSuchFile = Errno(ENOENT)
    public static let interrupted = Errno(EINTR)
    public static let ioError = Errno(EIO)
    public static let tooBig = Errno(E2BIG)
    public static let badFileDescriptor = Errno(EBADF)
    public static let wouldBlock = Errno(EAGAIN)
    public static let noMemory = Errno(ENOMEM)
    public static let accessDenied = Errno(EACCES)
    public static let badAddress = Errno(EFAULT)
    public static let busy = Errno(EBUSY)
    public static let exists = Errno(EEXIST)
    public static let noDevice = Errno(ENODEV)
    public static let invalidArgument = Errno(EINVAL)
    public static let fileTableFull = Errno(ENFILE)
    public static let tooManyOpenFiles = Errno(EMFILE)
    public static let noBufferSpace = Errno(ENOBUFS)
    public static let badFileDescriptorState = Errno(EBADFD)
    public static let notTTY = Errno(ENOTTY)
    public static let addressInUse = Errno(EADDRINUSE)
    public static let isDirectory = Errno(EISDIR)
}

/// A failed system call: which call, and the errno it returned.
public struct SyscallError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The call as a reader would search for it: `"ioctl(TUNSETIFF)"`, `"open(/dev/net/tun)"`.
    public let call: String
    public let errno: Errno

    public init(call: String, errno: Errno) {
        self.call = call
        self.errno = errno
    }

    public var description: String { "\(call): \(errno.name) (\(errno.message))" }
}
