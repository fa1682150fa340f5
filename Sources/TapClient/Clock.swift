import TunKit

/// Time for `mqtap stats --watch`.
public enum Clock {
    public static func seconds() -> Double { Double(TunKit.Clock.monotonicNanoseconds()) / 1e9 }

    public static func sleep(_ seconds: Double) { TunKit.Clock.sleep(seconds) }
}

/// Writes to stderr (TunKit owns the write).
public func printError(_ line: String) { writeStderrLine(line) }
