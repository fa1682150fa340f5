import Synchronization
@testable import TapCore
import TapTestSupport
import Testing

final class CollectingSink: EventSink {
    let got = Mutex<[Event]>([])
    let accept: Int
    init(accept: Int = .max) { self.accept = accept }
    func deliver(_ event: Event) -> Bool {
        got.withLock { g in
            g.append(event)
            return g.count < accept
        }
    }
    var ids: [UInt64] { got.withLock { $0.map(\.id) } }
}

@Suite("the event journal (no root)")
struct JournalTests {
    @Test("ids go up by one; the ring keeps the last N; replay after since; expired below the oldest minus one")
    func ringAndReplay() throws {
        let j = EventJournal(retention: 3)
        for _ in 0..<5 { j.publish(.limitsChanged) }
        #expect(try j.replay(after: nil).map(\.id) == [3, 4, 5])
        #expect(try j.replay(after: 2).map(\.id) == [3, 4, 5])
        #expect(try j.replay(after: 4).map(\.id) == [5])
        #expect(try j.replay(after: 9).isEmpty)
        #expect(throws: EventJournal.ReplayError.expired(since: 1, oldest: 3)) { try j.replay(after: 1) }
        #expect(j.boot.count == 16)
    }

    @Test("a subscriber gets every event after its replay, none twice; one that says no is dropped")
    func subscribe() throws {
        let j = EventJournal(retention: 10)
        j.publish(.deviceCreated, device: "a")
        let s = CollectingSink()
        #expect(try j.replay(after: 0, subscribing: s).map(\.id) == [1])
        j.publish(.deviceDeleted, device: "a")
        #expect(s.ids == [2])
        let stop = CollectingSink(accept: 1)
        _ = try j.replay(after: nil, subscribing: stop)
        #expect(j.watchers == 2)
        j.publish(.limitsChanged)
        #expect(j.watchers == 1, "a sink that returned false is dropped")
        j.unsubscribe(s)
        j.publish(.limitsChanged)
        #expect(s.ids == [2, 3] && j.watchers == 0)
    }

    @Test("the manager publishes what it does")
    func managerEvents() throws {
        let f = try FakeFixture()
        let s = CollectingSink()
        _ = try f.manager.journal.replay(after: nil, subscribing: s)
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        _ = try f.manager.addQueues("d")
        _ = try f.manager.setQueueEnabled("d", id: 1, false)
        _ = try f.manager.update("d", DevicePatch(mtu: 9000))
        try f.manager.removeQueue("d", id: 2)
        _ = try f.manager.setLimit(maxQueues: 10)
        f.driver.vanish("d")
        #expect(eventually { s.got.withLock { $0.last?.kind } == .deviceVanished })
        let kinds = s.got.withLock { $0.map(\.kind) }
        #expect(kinds == [.deviceCreated, .queueAdded, .queueDisabled, .deviceChanged, .queueRemoved, .limitsChanged,
                          .deviceVanished])
        #expect(s.got.withLock { $0[3].changes.map(\.0) } == ["mtu"])
    }

    @Test("failed writes on a queue become a rate-limited queue.errors event with the errno")
    func queueErrors() throws {
        // One worker with two queues reads them through epoll, non-blocking: a full peer is
        // EAGAIN (a solo worker's blocking write would wait on the fake's socket pair instead;
        // a real tun write never blocks).
        let f = try FakeFixture(workers: 1)
        let s = CollectingSink()
        _ = try f.manager.journal.replay(after: nil, subscribing: s)
        _ = try f.manager.create(DeviceSpec(name: "e", queues: 2, mode: .echo))
        let peer = f.driver.peer(of: f.driver.fds(of: "e")[0])!
        // Echoes nobody reads fill the pair's buffer: the worker's writes fail with EAGAIN.
        // Frames go in as the worker takes them (the pair holds only so many), until it does.
        let seen = eventually {
            for _ in 0..<50 { inject(peer, [UInt8](repeating: 0xab, count: 1000)) }
            return s.got.withLock { $0.contains { $0.kind == .queueErrors } }
        }
        #expect(seen)
        let e = s.got.withLock { $0.first { $0.kind == .queueErrors }! }
        #expect(e.device == "e" && e.queue == 0)
        #expect(e.changes.first { $0.0 == "direction" }?.1 == .string("write"))
        #expect(e.changes.first { $0.0 == "errno" }?.1 == .string("EAGAIN"))
        #expect(s.got.withLock { $0.filter { $0.kind == .queueErrors }.count } <= 2, "at most one a second")
    }
}
