#if canImport(Glibc)
import Glibc
#endif
import CTunLinux

/// Time and the log stream, for the executable's one-line-per-event log.
public enum Clock {
    /// Nanoseconds of CLOCK_MONOTONIC, for durations.
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Sleeps the calling thread.
    public static func sleep(_ seconds: Double) {
        var want = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - Double(Int(seconds))) * 1e9))
        var left = timespec()
        while nanosleep(&want, &left) == -1 && errno == EINTR { want = left }
    }

    /// UTC wall-clock time as RFC 3339 with milliseconds: `2026-11-21T06:10:00.123Z`.
    public static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = tm()
        var secs = ts.tv_sec
        gmtime_r(&secs, &t)
        // Digits written straight into the string's storage: this runs for every log line.
        return String(unsafeUninitializedCapacity: 24) { buf in
            var i = 0
            func digits(_ value: Int32, _ width: Int) {
                var v = Int(value)
                for k in stride(from: width - 1, through: 0, by: -1) {
                    buf[i + k] = UInt8(ascii: "0") + UInt8(v % 10)
                    v /= 10
                }
                i += width
            }
            func put(_ c: Unicode.Scalar) {
                buf[i] = UInt8(ascii: c)
                i += 1
            }
            digits(t.tm_year + 1900, 4); put("-"); digits(t.tm_mon + 1, 2); put("-"); digits(t.tm_mday, 2)
            put("T"); digits(t.tm_hour, 2); put(":"); digits(t.tm_min, 2); put(":"); digits(t.tm_sec, 2)
            put("."); digits(Int32(ts.tv_nsec / 1_000_000), 3); put("Z")
            return i
        }
    }
}

/// Writes one line to stderr in a single write(2), so lines from threads never interleave.
public func writeStderrLine(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
}

/// Writes one line to stdout at once (unbuffered: a follower's lines show as they come, on a
/// terminal or in a pipe). False once stdout is gone (EPIPE).
@discardableResult
public func writeStdoutLine(_ line: String) -> Bool {
    let bytes = Array((line + "\n").utf8)
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { Glibc.write(1, $0.baseAddress! + offset, $0.count - offset) }
        if n < 0 {
            if errno == EINTR { continue }
            return false
        }
        offset += n
    }
    return true
}
