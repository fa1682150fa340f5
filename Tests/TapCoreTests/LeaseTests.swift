import Foundation
import Synchronization
@testable import TapCore
import TapTestSupport
import Testing
import TunKit

/// A lease connection that only records being closed.
final class FakeConnection: LeaseConnection {
    let closed = Atomic<Int>(0)
    func close() { closed.add(1, ordering: .relaxed) }
    var closes: Int { closed.load(ordering: .relaxed) }
}

@Suite("leases over the fake driver (no root)")
struct LeaseTests {
    static let peer = Peer(pid: 4242, uid: 1000, gid: 1000)

    /// Grants, "sends" (the offer's duplicates are closed), and connects a lease.
    func lease(_ m: DeviceManager, _ device: String, _ queues: [Int]? = nil, holder: String? = "test") throws
        -> (Lease, FakeConnection) {
        let offer = try m.grantLease(device, LeaseRequest(queues: queues, holder: holder), peer: Self.peer)
        offer.close()
        let c = FakeConnection()
        #expect(offer.connect(c))
        return (offer, c)
    }

    @Test("a leased queue is not read by the workers; released, it is read again and counted")
    func workersLetGo() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        let fd1 = f.driver.fds(of: "d")[1]
        let (offer, _) = try lease(f.manager, "d", [1])
        #expect(offer.queues.map(\.id) == [1])
        #expect(try f.manager.queue("d", id: 1).lease == offer.id)
        #expect(try f.manager.queue("d", id: 0).lease == nil)
        inject(f.driver.peer(of: fd1)!, [UInt8](repeating: 7, count: 60))
        Thread.sleep(forTimeInterval: 0.1)
        #expect(try f.manager.queue("d", id: 1).counters.rxPackets == 0, "the holder reads a leased queue, not the daemon")
        offer.end()
        #expect(eventually { (try? f.manager.queue("d", id: 1).counters.rxPackets) == 1 })
        #expect(try f.manager.leases("d").isEmpty)
    }

    @Test("a queue the holder left attached, that cannot be detached again at the lease's end, is read and shown attached")
    func takeBackFails() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        _ = try f.manager.setQueueEnabled("d", id: 1, false)
        let fd1 = f.driver.fds(of: "d")[1]
        let (offer, _) = try lease(f.manager, "d", [1])
        // The holder attaches it through its own fd of the same open file.
        try f.driver.setQueue(fd1, enabled: true)
        f.driver.fail(.setQueue, with: .ioError)
        offer.end()
        #expect(try f.driver.isAttached(fd1), "the detach failed")
        #expect(try f.manager.leases("d").isEmpty)
        #expect(try f.manager.queue("d", id: 1).enabled, "the record follows the kernel")
        inject(f.driver.peer(of: fd1)!, [UInt8](repeating: 7, count: 60))
        #expect(eventually { (try? f.manager.queue("d", id: 1).counters.rxPackets) == 1 }, "an attached queue is read")
    }

    @Test("refusals: queue_leased, unknown queue, bad holder, a kept device; nothing changes")
    func refusals() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 3))
        let (offer, _) = try lease(f.manager, "d", [0, 2])
        #expect(throws: ManagerError.queueLeased(device: "d", id: 2, lease: offer.id)) {
            try f.manager.grantLease("d", LeaseRequest(queues: [1, 2]), peer: Self.peer)
        }
        #expect(try f.manager.queue("d", id: 1).lease == nil, "a refused lease leases nothing")
        #expect(throws: ManagerError.leasedQueueNotFound(device: "d", id: 7)) {
            try f.manager.grantLease("d", LeaseRequest(queues: [7]), peer: Self.peer)
        }
        #expect(throws: ManagerError.self) {
            try f.manager.grantLease("d", LeaseRequest(queues: [1], holder: String(repeating: "x", count: 129)), peer: Self.peer)
        }
        #expect(throws: ManagerError.self) { try f.manager.grantLease("d", LeaseRequest(queues: []), peer: Self.peer) }
        #expect(throws: ManagerError.self) { try f.manager.grantLease("d", LeaseRequest(queues: [1, 1]), peer: Self.peer) }
        #expect(throws: ManagerError.queueLeased(device: "d", id: 0, lease: offer.id)) { try f.manager.removeQueue("d", id: 0) }
        #expect(throws: ManagerError.deviceLeased(device: "d", leases: [offer.id])) { try f.manager.delete("d") }
        #expect(try f.manager.leases("d").map(\.id) == [offer.id])
        #expect(throws: ManagerError.leaseNotFound(device: "d", id: "lease-nope")) {
            try f.manager.revokeLease(device: "d", lease: "lease-nope")
        }
    }

    @Test("the lease offer passes duplicates of the queues' fds, closed once sent")
    func offerFDs() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        let before = ProcessResources.openFileCount()
        let offer = try f.manager.grantLease("d", LeaseRequest(), peer: Self.peer)
        #expect(offer.fds.count == 2 && Set(offer.fds).isDisjoint(with: f.driver.fds(of: "d")))
        #expect(ProcessResources.openFileCount() == before + 2)
        offer.close()
        offer.close()
        #expect(ProcessResources.openFileCount() == before)
    }

    @Test("revoke: the old file detached and kept, a fresh one for the id, the connection closed, the lease forgotten")
    func revoke() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        let (offer, c) = try lease(f.manager, "d", [1])
        let old = f.driver.fds(of: "d")[1]
        // The lease takes the device: queue 0 is held detached.
        #expect(f.driver.device("d")!.detached == [f.driver.fds(of: "d")[0]])
        try f.manager.revokeLease(device: "d", lease: offer.id)
        #expect(c.closes == 1)
        let q = try f.manager.queue("d", id: 1)
        #expect(q.enabled && q.lease == nil, "a fresh file, attached as the API had it")
        let fds = f.driver.fds(of: "d")
        #expect(fds.count == 3 && fds.contains(old))
        #expect(f.driver.device("d")!.detached == [old], "only the revoked file stays detached")
        let d = try f.manager.device("d")
        #expect(d.revokedQueues == 1 && d.consumer == .daemon && d.queues.map(\.id) == [0, 1])
        // The connection's close afterwards is a no-op for the manager.
        offer.end()
        #expect(try f.manager.device("d").revokedQueues == 1)
        // Deleting the device closes the kept file too.
        try f.manager.delete("d")
        #expect(f.driver.openFDs == 0)
    }

    @Test("release puts back the attach state the API last set, where the holder changed it")
    func releaseRestoresAttachState() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 4))
        _ = try f.manager.setQueueEnabled("d", id: 3, false)
        let (offer, _) = try lease(f.manager, "d")
        let fds = f.driver.fds(of: "d")
        // The holder (as QEMU does) detaches what its guest does not use, and attaches 3.
        try f.driver.setQueue(fds[1], enabled: false)
        try f.driver.setQueue(fds[2], enabled: false)
        try f.driver.setQueue(fds[3], enabled: true)
        let seen = try f.manager.device("d").queues.map(\.enabled)
        #expect(seen == [true, false, false, true], "the API shows the kernel's attach state")
        // While leased, the API still attaches and detaches (on its own fd: the same queue).
        _ = try f.manager.setQueueEnabled("d", id: 2, true)
        #expect(!f.driver.device("d")!.detached.contains(fds[2]))
        offer.end()
        #expect(try f.manager.device("d").queues.map(\.enabled) == [true, true, true, false])
        #expect(f.driver.device("d")!.detached == [fds[3]])
    }

    @Test("limits count leased queues; a forced delete revokes and deletes the link")
    func limitsAndForce() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 3))
        let (_, c) = try lease(f.manager, "d", [0, 1, 2])
        #expect(f.manager.limits().queuesInUse == 3)
        #expect(throws: ManagerError.self) { try f.manager.setLimit(maxQueues: 2) }
        try f.manager.delete("d", force: true)
        #expect(c.closes == 1)
        #expect(f.driver.device("d") == nil && f.driver.openFDs == 0)
        #expect(throws: ManagerError.deviceNotFound(name: "d")) { try f.manager.device("d") }
    }

    @Test("a restart keeps the holder's queues as an orphaned lease, deletes and re-creates nothing")
    func restoreOrphans() throws {
        let dir = StateDir()
        let driver = FakeDriver()
        var leaseID = ""
        do {
            let m = try DeviceManager(driver: driver, workers: 1, stateFile: dir.file)
            _ = try m.create(DeviceSpec(name: "vm", queues: 3))
            let (offer, _) = try lease(m, "vm", [1, 2], holder: "qemu")
            leaseID = offer.id
            #expect(dir.saved?.devices.first?.leases.map(\.id) == [leaseID])
            // The holder's fds keep the device alive when the daemon's go.
            driver.holdElsewhere("vm")
            m.shutdown()
        }
        #expect(driver.device("vm") != nil && driver.fds(of: "vm").isEmpty)
        let m = try DeviceManager(driver: driver, workers: 1, stateFile: dir.file)
        defer { m.shutdown() }
        #expect(m.restore(dir.saved!).isEmpty)
        let d = try m.device("vm")
        #expect(d.status == .active)
        #expect(d.queues.map(\.id) == [0, 1, 2])
        #expect(d.queues.map(\.leaseState) == [nil, .orphaned, .orphaned])
        #expect(driver.fds(of: "vm").count == 1, "only the daemon's own queue was opened again")
        let leases = try m.leases("vm")
        #expect(leases.map(\.id) == [leaseID] && leases[0].state == .orphaned && leases[0].holder == "qemu")
        #expect(leases[0].peer == Self.peer)
        #expect(m.limits().queuesInUse == 3)
        #expect(throws: ManagerError.queueLeased(device: "vm", id: 1, lease: leaseID)) { try m.removeQueue("vm", id: 1) }
        #expect(throws: ManagerError.deviceLeased(device: "vm", leases: [leaseID])) { try m.delete("vm") }
        // New queues do not take the orphans' ids.
        #expect(try m.addQueues("vm").map(\.id) == [3])
        // Forgetting the orphaned lease forgets its queues; then the device deletes.
        try m.revokeLease(device: "vm", lease: leaseID)
        #expect(try m.device("vm").queues.map(\.id) == [0, 3])
        try m.delete("vm")
        #expect(dir.saved?.devices == [])
    }
}

@Suite("declared queue counts (fake driver, no root)")
struct DeclaredCountTests {
    @Test("up and down, with the attached count; the highest free ids go, the smallest come")
    func upAndDown() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        var d = try f.manager.update("d", DevicePatch(queues: 8, enabledQueues: 4))
        #expect(d.queues.map(\.id) == Array(0..<8))
        #expect(d.queues.map(\.enabled) == [true, true, true, true, false, false, false, false])
        #expect(f.driver.fds(of: "d").count == 8 && f.driver.device("d")!.detached.count == 4)
        try f.manager.removeQueue("d", id: 1)
        d = try f.manager.update("d", DevicePatch(queues: 5))
        #expect(d.queues.map(\.id) == [0, 2, 3, 4, 5])
        d = try f.manager.update("d", DevicePatch(queues: 6, enabledQueues: 6))
        #expect(d.queues.map(\.id) == [0, 1, 2, 3, 4, 5] && d.enabledQueues == 6)
        d = try f.manager.update("d", DevicePatch(enabledQueues: 0))
        #expect(d.enabledQueues == 0 && f.driver.device("d")!.detached.count == 6)
    }

    @Test("refusals change nothing: above max_queues, not_enough_queues, too few unleased to remove")
    func refusals() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 4, maxQueues: 6))
        #expect(throws: ManagerError.queueLimitExceeded(device: "d", limit: 6, requested: 7, errno: nil)) {
            try f.manager.update("d", DevicePatch(queues: 7))
        }
        #expect(throws: ManagerError.notEnoughQueues(device: "d", queues: 5, enabled: 6)) {
            try f.manager.update("d", DevicePatch(queues: 5, enabledQueues: 6))
        }
        #expect(throws: ManagerError.self) { try f.manager.update("d", DevicePatch(queues: 0)) }
        #expect(throws: ManagerError.self) { try f.manager.update("d", DevicePatch(enabledQueues: 257)) }
        let offer = try f.manager.grantLease("d", LeaseRequest(queues: [1, 2, 3]), peer: LeaseTests.peer)
        offer.close()
        #expect(throws: ManagerError.queueLeased(device: "d", id: 3, lease: offer.id)) {
            try f.manager.update("d", DevicePatch(queues: 2))
        }
        // The lease has the device: queue 0 is held, attaching it is refused.
        #expect(throws: ManagerError.queuesHeld(device: "d", consumer: .lease, leases: [offer.id])) {
            try f.manager.update("d", DevicePatch(enabledQueues: 4))
        }
        let before = try f.manager.device("d")
        let opened = f.driver.calls(.openQueue)
        // A failure half-way (the kernel refuses the 6th queue) undoes the 5th too.
        f.driver.fail(.openQueue, with: .tooManyOpenFiles, after: 1)
        #expect(throws: ManagerError.self) { try f.manager.update("d", DevicePatch(queues: 6)) }
        #expect(f.driver.calls(.openQueue) == opened + 2)
        let after = try f.manager.device("d")
        #expect(after.queues.map(\.id) == before.queues.map(\.id))
        #expect(after.queues.map(\.enabled) == before.queues.map(\.enabled))
        #expect(f.driver.fds(of: "d").count == 4 && f.driver.device("d")!.detached == [f.driver.fds(of: "d")[0]])
        // Leased queues are skipped when removing: 4 → 3 removes the one queue not leased, 0.
        let d = try f.manager.update("d", DevicePatch(queues: 3))
        #expect(d.queues.map(\.id) == [1, 2, 3])
    }
}

@Suite("a lease's life: one object, one end (fake driver, no root)")
struct LeaseLifeTests {
    @Test("end is idempotent; a lease ended, or revoked, before it connects does not connect")
    func oneEnd() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        let a = try f.manager.grantLease("d", LeaseRequest(queues: [0]), peer: LeaseTests.peer)
        #expect(a.fds.count == 1)
        a.end()
        #expect(a.fds.isEmpty && a.isEnded)
        #expect(try f.manager.leases("d").isEmpty)
        // A second lease of the same queue, then the first's late end: nothing happens to it.
        let b = try f.manager.grantLease("d", LeaseRequest(queues: [0]), peer: LeaseTests.peer)
        a.end()
        #expect(try f.manager.leases("d").map(\.id) == [b.id])
        #expect(!a.connect(FakeConnection()), "an ended lease never goes live")
        // Revoked while offered: the hand-over's connect says so, and its end changes nothing.
        try f.manager.revokeLease(device: "d", lease: b.id)
        let c = FakeConnection()
        #expect(!b.connect(c))
        b.end()
        let d = try f.manager.device("d")
        #expect(d.consumer == .daemon && d.queues.map(\.enabled) == [true, true] && d.revokedQueues == 1)
        // Live, then ended twice (the watcher's hang-up and a failed step both call it).
        let e = try f.manager.grantLease("d", LeaseRequest(queues: [1]), peer: LeaseTests.peer)
        e.close()
        let ec = FakeConnection()
        #expect(e.connect(ec) && !e.connect(ec), "connects once")
        #expect(try f.manager.leases("d").map(\.state) == [.live])
        e.end()
        e.end()
        #expect(try f.manager.leases("d").isEmpty && f.manager.device("d").consumer == .daemon)
    }
}
