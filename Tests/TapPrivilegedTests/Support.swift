#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Synchronization
import TapCore
import TapTestSupport
import Testing
import TunKit

/// A manager on the real driver for one test, with every device it made deleted at the end
/// (through the manager, and with `ip link del` as a backstop for a failed test).
final class Fixture {
    let manager: DeviceManager
    private(set) var names: [String] = []

    init(workers: Int = 2, maxQueues: Int = 256) throws {
        manager = try DeviceManager(workers: workers, maxQueues: maxQueues)
        // Foundation's Process keeps a few fds after its first use; pay that before any
        // test takes an fd baseline.
        Host.run(["true"])
    }

    func name(_ tag: String = "t") -> String {
        let n = TestNames.next(tag)
        names.append(n)
        return n
    }

    /// Creates a device that is quiet until the test sends: created down, IPv6 off (no
    /// router solicitations or MLD reports of the kernel's own), then brought up.
    func quietDevice(queues: Int, mode: DeviceMode = .sink, tag: String = "q") throws -> DeviceInfo {
        let n = name(tag)
        _ = try manager.create(DeviceSpec(name: n, queues: queues, up: false, mode: mode))
        try Link.setIPv6Disabled(n, true)
        return try manager.update(n, DevicePatch(up: true))
    }

    deinit {
        manager.shutdown()
        for n in names { Host.deleteLink(n) }
    }
}

/// Frames sent to a device from another thread, in bursts 2 ms apart, while a test changes it.
final class BackgroundTraffic: Sendable {
    private let sent = Mutex(0)
    private let done = DispatchSemaphore(value: 0)

    init(_ dev: DeviceInfo, bursts: Int, of count: Int) {
        let (ifindex, mac) = (dev.ifindex!, dev.mac!.bytes)
        DispatchQueue.global().async { [self] in
            let sender = try! PacketSender(ifindex: ifindex)
            for _ in 0..<bursts {
                let n = sender.send(count: count, flows: 64, dst: mac)
                sent.withLock { $0 += n }
                usleep(2_000)
            }
            done.signal()
        }
    }

    /// Waits for the last burst; returns how many frames the kernel took.
    func wait() -> Int {
        done.wait()
        return sent.withLock { $0 }
    }
}

extension DeviceManager {
    func total(_ name: String) throws -> CounterValues { try stats(name).total }
    func kernel(_ name: String, _ key: String) throws -> UInt64 { try stats(name).kernel![key] ?? 0 }
}

let privileged = Testing.ConditionTrait.enabled(if: Privilege.shouldRun, Comment(rawValue: Privilege.skipReason))
