#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import TunKit

/// Whether privileged tests can run here, and what to say when they cannot.
public enum Privilege {
    public static var available: Bool { ProcessResources.isRoot && ProcessResources.canOpenTun }
    public static var inCI: Bool { ProcessInfo.processInfo.environment["CI"] == "true" }
    /// Privileged tests run where they can, and always in CI (where a skip is a failure).
    public static var shouldRun: Bool { available || inCI }
    public static let skipReason =
        "skipped: needs root and /dev/net/tun (with CI=true this is a failure, not a skip)"
}

/// Unique interface names for one test process: `mqt<pid%1e5><letter><n>`, ≤ 15 chars,
/// so parallel runs never collide and leftovers are recognisable.
public enum TestNames {
    private static let counter = Mutex(0)
    public static let prefix = "mqt\(getpid() % 100_000)"

    public static func next(_ tag: String = "t") -> String {
        let n = counter.withLock { c in
            c += 1
            return c
        }
        return String("\(prefix)\(tag.prefix(1))\(n)".prefix(15))
    }
}

/// Runs a host command (`ip`, `prlimit`) and returns its output.
public enum Host {
    @discardableResult
    public static func run(_ args: [String]) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        do { try p.run() } catch { return (-1, "\(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// `ip -d link show dev NAME`, or nil if there is no such interface.
    public static func linkDetails(_ name: String) -> String? {
        let r = run(["ip", "-d", "link", "show", "dev", name])
        return r.status == 0 ? r.output : nil
    }

    /// The `numqueues N` that `ip -d link` prints for a multiqueue tun/tap.
    public static func kernelQueueCount(_ name: String) -> Int? {
        guard let d = linkDetails(name), let r = d.range(of: "numqueues ") else { return nil }
        return Int(d[r.upperBound...].prefix { $0.isNumber })
    }

    public static func exists(_ name: String) -> Bool { linkDetails(name) != nil }

    /// The kernel's counters of an interface read from sysfs, one file each: the oracle the
    /// daemon's rtnetlink read (`Link.statistics(ifindex:)`) is checked against. Nil if it is gone.
    public static func sysfsStatistics(_ name: String) throws -> [String: UInt64]? {
        var out: [String: UInt64] = [:]
        for key in Link.statisticsKeys {
            guard let text = try readSmallFile("/sys/class/net/\(name)/statistics/\(key)") else { return nil }
            out[key] = UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        }
        return out
    }

    /// Deletes an interface if it exists (test cleanup; ignores "not found").
    public static func deleteLink(_ name: String) {
        if exists(name) { run(["ip", "link", "del", "dev", name]) }
    }
}

/// Polls `condition` every 10 ms until it holds or `seconds` pass; returns whether it held.
public func eventually(within seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(seconds * 1e9)
    while DispatchTime.now().uptimeNanoseconds < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}
