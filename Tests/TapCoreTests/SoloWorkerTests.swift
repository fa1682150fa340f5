#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Synchronization
import TapCore
import TapTestSupport
import Testing

/// Whether a queue fd is blocking: what a worker that reads its only queue sleeping inside
/// read() leaves it as (the epoll loop needs non-blocking fds).
private func blocking(_ fd: Int32) -> Bool { fcntl(fd, F_GETFL) & O_NONBLOCK == 0 }

@Suite("a worker with one queue reads it blocking and is kicked for commands (fake driver, no root)")
struct SoloWorkerTests {
    static let frame = WorkerTests.frame

    @Test("one queue: blocking reads; a second queue: both under epoll; back to one: blocking again")
    func transitions() throws {
        let f = try FakeFixture(workers: 1)
        _ = try f.manager.create(DeviceSpec(name: "d"))
        let first = f.driver.fds(of: "d")[0]
        #expect(eventually { blocking(first) })
        for _ in 0..<4 { #expect(inject(f.driver.peer(of: first)!, Self.frame)) }
        #expect(eventually { (try? f.manager.stats("d").total.rxPackets) == 4 })

        // The add completes only after the worker has put the first queue back under epoll.
        _ = try f.manager.addQueues("d")
        let second = f.driver.fds(of: "d")[1]
        #expect(!blocking(first) && !blocking(second))
        for fd in [first, second] {
            for _ in 0..<3 { #expect(inject(f.driver.peer(of: fd)!, Self.frame)) }
        }
        #expect(eventually { (try? f.manager.stats("d").queues.map(\.counters.rxPackets)) == [7, 3] })

        _ = try f.manager.removeQueue("d", id: 1)
        #expect(eventually { blocking(first) })
        #expect(inject(f.driver.peer(of: first)!, Self.frame))
        #expect(eventually { (try? f.manager.queue("d", id: 0).counters.rxPackets) == 8 })

        // Detached, the queue is no worker's; re-attached, it is read (blocking) again.
        _ = try f.manager.setQueueEnabled("d", id: 0, false)
        #expect(!blocking(first))
        #expect(inject(f.driver.peer(of: first)!, Self.frame))
        _ = try f.manager.setQueueEnabled("d", id: 0, true)
        #expect(eventually { (try? f.manager.queue("d", id: 0).counters.rxPackets) == 9 })
        #expect(eventually { blocking(first) })
    }

    @Test("2000 mode changes reach a solo worker while frames flow; no kick is lost, no frame uncounted")
    func kicks() throws {
        let f = try FakeFixture(workers: 1)
        _ = try f.manager.create(DeviceSpec(name: "d"))
        let fd = f.driver.fds(of: "d")[0]
        let peer = f.driver.peer(of: fd)!
        #expect(eventually { blocking(fd) })
        // A lost kick would leave a change waiting forever: the changes run on another thread
        // and the test gives up on them after a deadline instead of hanging.
        let changes = 2000
        let made = Atomic<Int>(0)
        let manager = f.manager
        DispatchQueue.global().async {
            for i in 0..<changes {
                _ = try? manager.update("d", DevicePatch(mode: i % 2 == 0 ? .echo : .sink))
                made.add(1, ordering: .relaxed)
            }
        }
        var sent = 0, echoed = 0
        while made.load(ordering: .relaxed) < changes && sent < 20_000 {
            if inject(peer, Self.frame) { sent += 1 }
            while receive(peer) != nil { echoed += 1 }
            if sent % 64 == 0 { usleep(100) }
        }
        let finished = eventually(within: 30) { made.load(ordering: .relaxed) == changes }
        #expect(finished, "\(made.load(ordering: .relaxed)) of \(changes) changes completed")
        guard finished else {
            // The worker is stuck: leak the fixture rather than hang in its shutdown.
            _ = Unmanaged.passRetained(f)
            return
        }
        #expect(eventually { (try? f.manager.stats("d").total.rxPackets) == UInt64(sent) })
        let t = try f.manager.stats("d").total
        while receive(peer) != nil { echoed += 1 }
        #expect(t.txPackets == UInt64(echoed) && t.txErrors == 0 && t.rxErrors == 0)
        #expect(sent > 0)
    }

    @Test("a solo queue whose peer vanishes is dropped by the worker's read alone")
    func vanished() throws {
        let f = try FakeFixture(workers: 1)
        _ = try f.manager.create(DeviceSpec(name: "d"))
        #expect(eventually { blocking(f.driver.fds(of: "d")[0]) })
        f.driver.vanish("d")
        #expect(eventually(within: 1) { f.manager.limits().devices == 0 })
        #expect(f.driver.openFDs == 0)
    }
}
