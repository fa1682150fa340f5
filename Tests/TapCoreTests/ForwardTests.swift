import Dispatch
import Synchronization
@testable import TapCore
import TapTestSupport
import Testing
import TunKit

@Suite("forward mode over the fake driver (no root)")
struct ForwardTests {
    static let frame = [UInt8](repeating: 0x5a, count: 120)

    @Test("refusals name the field and change nothing")
    func refusals() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "b"))
        _ = try f.manager.create(DeviceSpec(name: "t", kind: .tun))
        _ = try f.manager.create(DeviceSpec(name: "v", vnetHdr: true))
        let cases: [(DeviceSpec, ManagerError)] = [
            (DeviceSpec(name: "a", mode: .forward), .invalidField(field: "peer", reason: "mode forward needs a peer device")),
            (DeviceSpec(name: "a", peer: "b"), .invalidField(field: "peer", reason: "a peer is only for mode forward")),
            (DeviceSpec(name: "a", mode: .forward, peer: "a"), .invalidField(field: "peer", reason: "a device cannot forward to itself")),
            (DeviceSpec(name: "a", mode: .forward, peer: "nope"), .peerUnavailable(device: "a", peer: "nope")),
            (DeviceSpec(name: "a", mode: .forward, peer: "t"), .peerMismatch(field: "type", peer: "t")),
            (DeviceSpec(name: "a", mode: .forward, peer: "v"), .peerMismatch(field: "vnet_hdr", peer: "v")),
        ]
        let opened = f.driver.calls(.openQueue)
        for (spec, error) in cases {
            #expect(throws: error) { try f.manager.create(spec) }
        }
        #expect(throws: ManagerError.self) { try f.manager.create(DeviceSpec(name: "o", offload: true)) }
        #expect(f.driver.calls(.openQueue) == opened)
        #expect(throws: ManagerError.invalidField(field: "peer", reason: "a peer is only for mode forward")) {
            try f.manager.update("b", DevicePatch(mode: .echo, peer: "t"))
        }
        #expect(throws: ManagerError.invalidField(field: "peer", reason: "mode forward needs a peer device")) {
            try f.manager.update("b", DevicePatch(mode: .forward))
        }
        #expect(throws: ManagerError.peerMismatch(field: "type", peer: "t")) {
            try f.manager.update("b", DevicePatch(mode: .forward, peer: "t"))
        }
        #expect(try f.manager.device("b").mode == .sink)
        let d = try f.manager.create(DeviceSpec(name: "w", vnetHdr: true, offload: true))
        #expect(d.offload && d.offloads == ["csum", "tso4", "tso6"], "USO is left out where the kernel refuses it")
    }

    @Test("frames go to the peer's queue with the same index modulo its count; counters add up")
    func forwards() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "b", queues: 2))
        let a = try f.manager.create(DeviceSpec(name: "a", queues: 3, mode: .forward, peer: "b"))
        #expect(a.peer == "b" && a.peerState == .active)
        let aFDs = f.driver.fds(of: "a"), bFDs = f.driver.fds(of: "b")
        for (i, fd) in aFDs.enumerated() {
            for _ in 0..<(i + 1) { #expect(inject(f.driver.peer(of: fd)!, Self.frame)) }
        }
        // a's queue 0 and 2 go to b's queue 0; a's 1 to b's 1.
        #expect(eventually { (try? f.manager.stats("b").total.txPackets) == 6 })
        let b = try f.manager.stats("b")
        #expect(b.queues.map(\.counters.txPackets) == [1 + 3, 2])
        #expect(b.total.txBytes == 6 * 120)
        #expect(try f.manager.stats("a").total.rxPackets == 6 && f.manager.stats("a").total.dropped == 0)
        var got = 0
        while receive(f.driver.peer(of: bFDs[0])!) == Self.frame { got += 1 }
        #expect(got == 4)
    }

    @Test("without a peer frames are dropped and counted; a new device of the name is picked up")
    func missingPeer() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "b"))
        _ = try f.manager.create(DeviceSpec(name: "a", mode: .forward, peer: "b"))
        try f.manager.delete("b")
        #expect(try f.manager.device("a").peerState == .missing)
        let src = f.driver.peer(of: f.driver.fds(of: "a")[0])!
        inject(src, Self.frame)
        #expect(eventually { (try? f.manager.stats("a").total.dropped) == 1 })
        _ = try f.manager.create(DeviceSpec(name: "b"))
        #expect(try f.manager.device("a").peerState == .active)
        inject(src, Self.frame)
        #expect(eventually { (try? f.manager.stats("b").total.txPackets) == 1 })
        #expect(try f.manager.stats("a").total.rxPackets == 2)
    }

    @Test("under traffic: peer queues removed, the peer deleted and made again, modes switched; no frame ever reaches an fd that is not the peer's")
    func fence() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "b", queues: 4))
        _ = try f.manager.create(DeviceSpec(name: "a", queues: 2, mode: .forward, peer: "b"))
        let sources = f.driver.fds(of: "a").map { f.driver.peer(of: $0)! }
        let stop = Atomic<Bool>(false)
        let sent = Atomic<Int>(0)
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            while !stop.load(ordering: .relaxed) {
                for s in sources where inject(s, Self.frame) { sent.add(1, ordering: .relaxed) }
            }
            done.signal()
        }
        var bystanders: [Int32] = []
        for round in 0..<30 {
            try f.manager.removeQueue("b", id: 3)
            _ = try f.manager.addQueues("b")
            _ = try f.manager.setQueueEnabled("b", id: 1, round % 2 == 0)
            if round % 5 == 0 {
                try f.manager.delete("b")
                // Fresh fds that may take the numbers b's had: nothing may arrive on them.
                _ = try f.manager.create(DeviceSpec(name: "c\(round)", queues: 2))
                bystanders += f.driver.fds(of: "c\(round)").map { f.driver.peer(of: $0)! }
                _ = try f.manager.create(DeviceSpec(name: "b", queues: 4))
            }
            if round % 7 == 0 {
                _ = try f.manager.update("a", DevicePatch(mode: .sink))
                _ = try f.manager.update("a", DevicePatch(mode: .forward, peer: "b"))
            }
        }
        stop.store(true, ordering: .relaxed)
        done.wait()
        #expect(sent.load(ordering: .relaxed) > 0)
        for fd in bystanders { #expect(receive(fd) == nil, "a frame reached a device that is not the peer") }
        let a = try f.manager.stats("a").total
        #expect(eventually { (try? f.manager.stats("a").total.rxPackets) == UInt64(sent.load(ordering: .relaxed)) })
        #expect(a.rxPackets >= a.dropped)
    }

    @Test("the state file keeps mode, peer and offload; a restart brings the wire back whichever comes first")
    func restore() throws {
        let dir = StateDir()
        do {
            let m = try DeviceManager(driver: FakeDriver(), workers: 1, stateFile: dir.file)
            _ = try m.create(DeviceSpec(name: "z", vnetHdr: true))
            _ = try m.create(DeviceSpec(name: "a", vnetHdr: true, mode: .forward, peer: "z", offload: true))
            _ = try m.update("z", DevicePatch(mode: .forward, peer: "a"))
            m.shutdown()
        }
        let saved = try #require(dir.saved)
        #expect(saved.devices.map { [$0.spec.name, $0.spec.peer ?? "-"] } == [["a", "z"], ["z", "a"]])
        #expect(saved.devices[0].spec.offload)
        let driver = FakeDriver()
        let m = try DeviceManager(driver: driver, workers: 1, stateFile: dir.file)
        defer { m.shutdown() }
        #expect(m.restore(saved).isEmpty)
        // "a" came back before its peer "z": it forwards all the same.
        #expect(try m.device("a").peerState == .active && m.device("a").offloads == ["csum", "tso4", "tso6"])
        inject(driver.peer(of: driver.fds(of: "a")[0])!, Self.frame + [UInt8](repeating: 0, count: 10))
        #expect(eventually { (try? m.stats("z").total.txPackets) == 1 })
        #expect(try m.stats("z").total.txBytes == 120, "bytes leave the vnet header out")
    }
}
