import Foundation
@testable import TapCore
import TapTestSupport
import Testing
import TunKit

/// One consumer per device (issue 19) over the fake driver: who reads, what is held, what a
/// holder's settings do, and what is put back.
@Suite("one consumer per device (fake driver, no root)")
struct ConsumerTests {
    let peer = LeaseTests.peer

    func detached(_ f: FakeFixture, _ name: String) -> Int { f.driver.device(name)!.detached.count }

    @Test("external: the daemon's queues are held detached and never read; a PATCH to sink reads them")
    func external() throws {
        let f = try FakeFixture()
        let d = try f.manager.create(DeviceSpec(name: "x", queues: 3, mode: .external))
        #expect(d.consumer == .external && d.enabledQueues == 0 && detached(f, "x") == 3)
        let fd0 = f.driver.fds(of: "x")[0]
        inject(f.driver.peer(of: fd0)!, [UInt8](repeating: 1, count: 60))
        Thread.sleep(forTimeInterval: 0.05)
        #expect(try f.manager.stats("x").total.rxPackets == 0, "an external device's queues are not read")
        #expect(throws: ManagerError.queuesHeld(device: "x", consumer: .external, leases: [])) {
            try f.manager.setQueueEnabled("x", id: 1, true)
        }
        // Queues added meanwhile are held too; detaching one records what the API wants.
        _ = try f.manager.addQueues("x")
        #expect(detached(f, "x") == 4)
        _ = try f.manager.setQueueEnabled("x", id: 3, false)
        let back = try f.manager.update("x", DevicePatch(mode: .sink))
        #expect(back.consumer == .daemon && back.queues.map(\.enabled) == [true, true, true, false])
        #expect(detached(f, "x") == 1)
        // The frame injected while held is still in the fake's pair (a real detach purges it);
        // either way, from now on frames are read and counted.
        #expect(eventually { (try? f.manager.stats("x").total.rxPackets) ?? 0 >= 1 })
        // And to external again, with the state file entry saying so.
        #expect(try f.manager.update("x", DevicePatch(mode: .external)).enabledQueues == 0)
        #expect(detached(f, "x") == 4)
    }

    @Test("a lease takes the device; its end gives the other queues back as the API set them")
    func leaseTakesDevice() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 4))
        _ = try f.manager.setQueueEnabled("d", id: 3, false)
        let offer = try f.manager.grantLease("d", LeaseRequest(queues: [0]), peer: peer)
        offer.close()
        var d = try f.manager.device("d")
        #expect(d.consumer == .lease && d.queues.map(\.enabled) == [true, false, false, false])
        offer.end()
        d = try f.manager.device("d")
        #expect(d.consumer == .daemon && d.queues.map(\.enabled) == [true, true, true, false])
    }

    @Test("one consumer for forwarding: no lease or external on a device that forwards or is forwarded to")
    func forwarding() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "a", queues: 1))
        _ = try f.manager.create(DeviceSpec(name: "b", queues: 1, mode: .forward, peer: "a"))
        #expect(throws: ManagerError.deviceForwarding(device: "a", reason: "is forwarded to by b and cannot be leased", field: nil)) {
            try f.manager.grantLease("a", LeaseRequest(), peer: peer)
        }
        #expect(throws: ManagerError.deviceForwarding(device: "b", reason: "forwards to a and cannot be leased", field: nil)) {
            try f.manager.grantLease("b", LeaseRequest(), peer: peer)
        }
        #expect(throws: ManagerError.deviceForwarding(device: "a", reason: "cannot be external: b forwards to it", field: "mode")) {
            try f.manager.update("a", DevicePatch(mode: .external))
        }
        _ = try f.manager.update("b", DevicePatch(mode: .sink))
        let offer = try f.manager.grantLease("a", LeaseRequest(), peer: peer)
        offer.close()
        #expect(throws: ManagerError.deviceForwarding(device: "b", reason: "cannot forward to a: it is leased", field: "peer")) {
            try f.manager.update("b", DevicePatch(mode: .forward, peer: "a"))
        }
        #expect(throws: ManagerError.deviceForwarding(device: "c", reason: "cannot forward to a: it is leased", field: "peer")) {
            try f.manager.create(DeviceSpec(name: "c", queues: 1, mode: .forward, peer: "a"))
        }
    }

    @Test("a holder's header size stops the workers; its end puts the settings back and they read again")
    func settings() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "v", queues: 2, vnetHdr: true, owner: 1000))
        let offer = try f.manager.grantLease("v", LeaseRequest(queues: [1]), peer: peer)
        offer.close()
        f.driver.holderSets("v", vnet: VnetSettings(headerSize: 12, littleEndian: true, bigEndian: false))
        f.driver.holderSets("v", owner: 65534, group: 7)
        var d = try f.manager.device("v")
        #expect(d.vnetHdrSize == 12 && d.owner == 65534 && d.group == 7)
        #expect(d.settingsDiffer == ["vnet_hdr_size", "vnet_byte_order", "owner", "group"])
        let cleared = f.driver.device("v")!.programsCleared
        offer.end()
        d = try f.manager.device("v")
        #expect(d.vnetHdrSize == 10 && d.owner == 1000 && d.settingsDiffer == ["group"],
                "the group a holder set cannot be cleared: it is shown")
        #expect(f.driver.device("v")!.vnet == VnetSettings(headerSize: 10, littleEndian: false, bigEndian: false))
        #expect(f.driver.device("v")!.programsCleared > cleared)
        #expect(d.enabledQueues == 2 && d.unreadable == nil)

        // A by-name holder (the daemon is the consumer, frames are split) sets 12: the
        // workers stop reading until it goes and the size is back.
        f.driver.attachForeign("v", 1)
        f.driver.holderSets("v", vnet: VnetSettings(headerSize: 12, littleEndian: false, bigEndian: false))
        #expect(eventually { (try? f.manager.device("v"))?.unreadable != nil })
        #expect(try f.manager.device("v").enabledQueues == 0)
        #expect(try f.manager.device("v").stateReason?.contains("vnet header size is 12") == true)
        f.driver.attachForeign("v", -1)
        #expect(eventually { (try? f.manager.device("v"))?.unreadable == nil })
        #expect(try f.manager.device("v").enabledQueues == 2)
        #expect(f.driver.device("v")!.vnet.headerSize == 10)
    }

    @Test("leases past --max-leases are refused; an ended one frees its place")
    func leaseLimit() throws {
        let f = try FakeFixture(maxLeases: 2)
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 3))
        let a = try f.manager.grantLease("d", LeaseRequest(queues: [0]), peer: peer)
        let b = try f.manager.grantLease("d", LeaseRequest(queues: [1]), peer: peer)
        a.close()
        b.close()
        #expect(throws: ManagerError.leaseLimit(limit: 2)) {
            try f.manager.grantLease("d", LeaseRequest(queues: [2]), peer: peer)
        }
        a.end()
        let c = try f.manager.grantLease("d", LeaseRequest(queues: [2]), peer: peer)
        c.close()
    }

    @Test("the device total keeps what removed queues counted")
    func retired() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 3))
        for fd in f.driver.fds(of: "d") { inject(f.driver.peer(of: fd)!, [UInt8](repeating: 2, count: 60)) }
        #expect(eventually { (try? f.manager.stats("d").total.rxPackets) == 3 })
        _ = try f.manager.removeQueue("d", id: 2)
        _ = try f.manager.update("d", DevicePatch(queues: 1))
        let s = try f.manager.stats("d")
        #expect(s.queues.count == 1 && s.total.rxPackets == 3 && s.total.rxBytes == 180)
    }

    @Test("a one-queue external device: no file held, persistent, found by its index, deleted by it")
    func anchored() throws {
        let f = try FakeFixture()
        let before = f.driver.openFDs
        var spec = DeviceSpec(name: "s", mode: .external)
        spec.multiQueue = false
        let d = try f.manager.create(spec)
        #expect(d.persist && d.queueCount == 0 && d.consumer == .external && !d.multiQueue)
        #expect(f.driver.openFDs == before, "the daemon holds no file of it")
        #expect(f.driver.device("s")?.persist == true, "kept alive by persistence")
        f.driver.attachForeign("s", 1)
        #expect(try f.manager.device("s").kernel?.foreignQueues == 1)
        #expect(throws: ManagerError.notMultiQueue(device: "s")) { try f.manager.addQueues("s") }
        #expect(throws: ManagerError.self) { try f.manager.update("s", DevicePatch(mode: .sink)) }
        _ = try f.manager.update("s", DevicePatch(mtu: 1400))
        #expect(f.driver.device("s")?.mtu == 1400)
        try f.manager.delete("s")
        #expect(f.driver.device("s") == nil)
    }
}
