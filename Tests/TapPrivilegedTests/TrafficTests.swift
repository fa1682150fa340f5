import Dispatch
import Foundation
import Synchronization
import TapCore
import TapTestSupport
import Testing
import TunKit

@Suite("traffic on real multiqueue taps", .serialized, privileged)
struct TrafficTests {
    @Test("sink: per-queue rx counters add up to what the kernel transmitted")
    func sinkCountersExact() throws {
        let f = try Fixture()
        let dev = try f.quietDevice(queues: 4)
        let txBefore = try f.manager.kernel(dev.name, "tx_packets")
        let dropBefore = try f.manager.kernel(dev.name, "tx_dropped")
        let sender = try PacketSender(ifindex: dev.ifindex!)
        let n = 20_000
        let sent = sender.send(count: n, flows: 64, dst: dev.mac!.bytes)
        #expect(sent == n)
        // Settled: every frame the kernel took is either counted by a queue or dropped.
        let settled = eventually {
            let s = try! f.manager.stats(dev.name)
            return s.total.rxPackets + (s.kernel!["tx_dropped"]! - dropBefore) == UInt64(sent)
        }
        let s = try f.manager.stats(dev.name)
        let dropped = s.kernel!["tx_dropped"]! - dropBefore
        #expect(settled, "rx \(s.total.rxPackets) + dropped \(dropped) != sent \(sent)")
        #expect(s.total.rxPackets == s.kernel!["tx_packets"]! - txBefore)
        #expect(s.total.rxBytes == UInt64(60) * s.total.rxPackets)
        #expect(s.queues.count == 4)
        for q in s.queues {
            #expect(q.counters.rxPackets > 0, "queue \(q.id) received nothing: \(s.queues)")
        }
        #expect(s.total.txPackets == 0)
        #expect(s.total.rxErrors == 0)
        // The rtnetlink read the API uses agrees with sysfs, counter by counter.
        #expect(try Link.info(ifindex: dev.ifindex!)?.statistics == Host.sysfsStatistics(dev.name))
        #expect(try Link.info(ifindex: 999_999)?.statistics == nil)
    }
}

@Suite("echo, detach and queue churn under traffic", .serialized, privileged)
struct QueueTrafficTests {
    @Test("echo: every frame read is written back; the kernel receives the same number")
    func echoCountersMatch() throws {
        let f = try Fixture()
        let dev = try f.quietDevice(queues: 4, mode: .echo)
        let rxBefore = try f.manager.kernel(dev.name, "rx_packets")
        let dropBefore = try f.manager.kernel(dev.name, "tx_dropped")
        let sender = try PacketSender(ifindex: dev.ifindex!)
        let sent = sender.send(count: 10_000, flows: 64, dst: dev.mac!.bytes)
        let settled = eventually {
            let s = try! f.manager.stats(dev.name)
            return s.total.rxPackets + (s.kernel!["tx_dropped"]! - dropBefore) == UInt64(sent)
                && s.kernel!["rx_packets"]! - rxBefore == s.total.txPackets
        }
        let s = try f.manager.stats(dev.name)
        #expect(settled, "\(s)")
        #expect(s.total.txPackets == s.total.rxPackets)
        #expect(s.total.txBytes == s.total.rxBytes)
        #expect(s.total.txErrors == 0)
        #expect(s.kernel!["rx_packets"]! - rxBefore == s.total.txPackets)
        for q in s.queues {
            #expect(q.counters.txPackets == q.counters.rxPackets, "queue \(q.id)")
        }
    }

    @Test("a detached queue stops counting while the others go on; re-attached, it counts again")
    func detachAndReattach() throws {
        let f = try Fixture()
        let dev = try f.quietDevice(queues: 4)
        let sender = try PacketSender(ifindex: dev.ifindex!)
        let off = try f.manager.setQueueEnabled(dev.name, id: 2, false)
        #expect(!off.enabled)
        #expect(Host.kernelQueueCount(dev.name) == 3)
        let frozen = try f.manager.queue(dev.name, id: 2).counters
        let dropBefore = try f.manager.kernel(dev.name, "tx_dropped")
        let before = try f.manager.total(dev.name).rxPackets
        let sent = sender.send(count: 8_000, flows: 64, dst: dev.mac!.bytes)
        let settled = eventually {
            let s = try! f.manager.stats(dev.name)
            return s.total.rxPackets - before + (s.kernel!["tx_dropped"]! - dropBefore) == UInt64(sent)
        }
        #expect(settled)
        let s = try f.manager.stats(dev.name)
        #expect(s.queues.first { $0.id == 2 }!.counters == frozen, "a detached queue must not count")
        for q in s.queues where q.id != 2 { #expect(q.counters.rxPackets > 0, "queue \(q.id)") }

        let on = try f.manager.setQueueEnabled(dev.name, id: 2, true)
        #expect(on.enabled)
        #expect(Host.kernelQueueCount(dev.name) == 4)
        _ = sender.send(count: 8_000, flows: 64, dst: dev.mac!.bytes)
        #expect(eventually { (try? f.manager.queue(dev.name, id: 2).counters.rxPackets) ?? 0 > frozen.rxPackets })
    }

    @Test("removing a queue while traffic flows loses nothing beyond the kernel's own drops")
    func removeUnderTraffic() throws {
        let f = try Fixture()
        let dev = try f.quietDevice(queues: 4)
        let txBefore = try f.manager.kernel(dev.name, "tx_packets")
        let dropBefore = try f.manager.kernel(dev.name, "tx_dropped")
        // Traffic from another thread while the queue goes away.
        let traffic = BackgroundTraffic(dev, bursts: 20, of: 1_000)
        #expect(eventually { (try? f.manager.queue(dev.name, id: 3).counters.rxPackets) ?? 0 > 0 })
        let removed = try f.manager.removeQueue(dev.name, id: 3)
        let total = traffic.wait()
        let survivors = { () -> (rx: UInt64, dropped: UInt64, kernelTx: UInt64) in
            let s = try! f.manager.stats(dev.name)
            return (s.total.rxPackets, s.kernel!["tx_dropped"]! - dropBefore, s.kernel!["tx_packets"]! - txBefore)
        }
        // The kernel counts tx when a frame is read from a queue: every frame it says it
        // transmitted was counted by exactly one queue, and the device's total keeps what the
        // removed one counted.
        #expect(removed.counters.rxPackets > 0)
        #expect(eventually { let v = survivors(); return v.rx == v.kernelTx })
        let v = survivors()
        #expect(v.rx == v.kernelTx, "\(v) removed=\(removed.counters.rxPackets)")
        // What is neither transmitted nor dropped can only be frames that sat in the removed
        // queue's ring (at most its length, the device's txqueuelen) when it was closed.
        let unaccounted = UInt64(total) - v.kernelTx - v.dropped
        #expect(unaccounted <= 1_000, "sent \(total): \(v)")
        #expect(Host.kernelQueueCount(dev.name) == 3)
        #expect(try f.manager.device(dev.name).queues.map(\.id) == [0, 1, 2])

        // After the removal, the remaining queues account for every frame exactly.
        let before = survivors()
        let sender = try PacketSender(ifindex: dev.ifindex!)
        let more = sender.send(count: 5_000, flows: 64, dst: dev.mac!.bytes)
        #expect(eventually { let a = survivors(); return (a.rx - before.rx) + (a.dropped - before.dropped) == UInt64(more) })
    }
}

@Suite("a worker with one queue: blocking reads on a real tap", .serialized, privileged)
struct SoloTrafficTests {
    @Test("sink and echo on a worker's only queue: counters exact against the kernel's")
    func soloCountersExact() throws {
        let f = try Fixture(workers: 1)
        let dev = try f.quietDevice(queues: 1, mode: .echo)
        let before = try f.manager.stats(dev.name).kernel!
        let sender = try PacketSender(ifindex: dev.ifindex!)
        let sent = sender.send(count: 10_000, flows: 64, dst: dev.mac!.bytes)
        let delta = { (key: String) -> UInt64 in try! f.manager.kernel(dev.name, key) - before[key]! }
        #expect(eventually {
            let t = try! f.manager.total(dev.name)
            return t.rxPackets + delta("tx_dropped") == UInt64(sent) && t.txPackets == delta("rx_packets")
        })
        let t = try f.manager.total(dev.name)
        #expect(t.rxPackets == delta("tx_packets"))
        #expect(t.txPackets == t.rxPackets && t.txErrors == 0 && t.rxErrors == 0)

        // Switched to sink while the worker sleeps in read(): the kick gets it there.
        _ = try f.manager.update(dev.name, DevicePatch(mode: .sink))
        let rx = t.rxPackets, tx = t.txPackets, dropped = delta("tx_dropped")
        let more = sender.send(count: 5_000, flows: 64, dst: dev.mac!.bytes)
        #expect(eventually {
            try! f.manager.total(dev.name).rxPackets - rx + delta("tx_dropped") - dropped == UInt64(more)
        })
        let after = try f.manager.total(dev.name)
        #expect(after.rxPackets == delta("tx_packets"))
        #expect(after.txPackets == tx, "sink must not echo")
    }

    @Test("queues added to and removed from a solo worker under traffic: every frame counted once")
    func soloChurnUnderTraffic() throws {
        let f = try Fixture(workers: 1)
        let dev = try f.quietDevice(queues: 1)
        let before = try f.manager.stats(dev.name).kernel!
        let traffic = BackgroundTraffic(dev, bursts: 40, of: 500)
        // One queue (blocking read) → two (epoll) → one again, five times, under traffic.
        var removed: UInt64 = 0
        for _ in 0..<5 {
            let added = try f.manager.addQueues(dev.name)
            usleep(5_000)
            removed += try f.manager.removeQueue(dev.name, id: added[0].id).counters.rxPackets
            usleep(5_000)
        }
        let total = UInt64(traffic.wait())
        let tally = { () -> (rx: UInt64, kernelTx: UInt64, dropped: UInt64) in
            let s = try! f.manager.stats(dev.name)
            // The total keeps what the removed queues counted.
            return (s.total.rxPackets, s.kernel!["tx_packets"]! - before["tx_packets"]!,
                    s.kernel!["tx_dropped"]! - before["tx_dropped"]!)
        }
        // Every frame the kernel says it transmitted was counted by exactly one queue.
        #expect(removed > 0)
        #expect(eventually { let v = tally(); return v.rx == v.kernelTx })
        let v = tally()
        #expect(v.rx == v.kernelTx, "\(v)")
        // Frames neither transmitted nor dropped sat in a removed queue's ring when it closed.
        #expect(total - v.kernelTx - v.dropped <= 5 * 1_000, "sent \(total): \(v)")
        #expect(try f.manager.device(dev.name).queues.map(\.id) == [0])
    }
}
