import Dispatch
import Synchronization
import TapCore
import TapTestSupport
import Testing
import TunKit

/// A manager over the fake driver, shut down at the end of the test.
final class FakeFixture {
    let driver = FakeDriver()
    let manager: DeviceManager

    init(workers: Int = 2, maxQueues: Int = 256, maxLeases: Int = 1024) throws {
        manager = try DeviceManager(driver: driver, workers: workers, maxQueues: maxQueues, maxLeases: maxLeases)
    }

    deinit { manager.shutdown() }
}

@Suite("DeviceManager decisions and rollback (fake driver, no root)")
struct ManagerTests {
    @Test("queues others attach count toward the limits; a renamed device is changed under its new name")
    func foreignAndRenamed() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2, maxQueues: 3))
        f.driver.attachForeign("d", 1)
        #expect(try f.manager.device("d").kernel?.foreignQueues == 1)
        #expect(throws: ManagerError.queueLimitExceeded(device: "d", limit: 3, requested: 4, errno: nil, field: "count")) {
            try f.manager.addQueues("d", count: 1)
        }
        #expect(throws: ManagerError.limitBelowUsage(field: "max_queues", limit: 2, device: "d", inUse: 3)) {
            try f.manager.update("d", DevicePatch(maxQueues: 2))
        }
        f.driver.attachForeign("d", -1)
        f.driver.rename("d", to: "e")
        // Another interface takes the old name: nothing may reach it.
        f.driver.addForeign("d")
        let d = try f.manager.update("d", DevicePatch(mtu: 1400))
        #expect(d.kernel?.name == "e" && d.stateReason?.contains("renamed in the kernel to e") == true)
        #expect(f.driver.device("e")?.mtu == 1400)
        #expect(try f.manager.addQueues("d", count: 1).count == 1)
        #expect(f.driver.fds(of: "e").count == 3)
    }

    @Test("names the kernel would mangle are refused before any syscall",
          arguments: ["", "a234567890123456", "1abc", "-x", "a b", "a/b", "a%d", "é", "tap:0", "a\u{0}b"])
    func badNames(_ name: String) throws {
        let f = try FakeFixture()
        #expect {
            try f.manager.create(DeviceSpec(name: name))
        } throws: { ($0 as? ManagerError)?.field == "name" }
        #expect(f.driver.calls(.openQueue) == 0)
    }

    @Test("good names", arguments: ["a", "tap0", "vm-12.net_3", "A23456789012345"])
    func goodNames(_ name: String) throws {
        try Validate.name(name)
    }

    @Test("field ranges are checked before the kernel is asked")
    func ranges() throws {
        let f = try FakeFixture()
        let cases: [(DeviceSpec, String)] = [
            (DeviceSpec(name: "a", queues: 0), "queues"),
            (DeviceSpec(name: "a", maxQueues: 0), "max_queues"),
            (DeviceSpec(name: "a", maxQueues: 257), "max_queues"),
            (DeviceSpec(name: "a", mtu: 67), "mtu"),
            (DeviceSpec(name: "a", mtu: 65522), "mtu"),
            (DeviceSpec(name: "a", kind: .tun, mac: MACAddress("02:00:00:00:00:01")), "mac"),
            (DeviceSpec(name: "a", mac: MACAddress("01:00:5e:00:00:01")), "mac"),
            (DeviceSpec(name: "a", mac: MACAddress("00:00:00:00:00:00")), "mac"),
        ]
        for (spec, field) in cases {
            #expect(throws: ManagerError.self) { try f.manager.create(spec) }
            do {
                _ = try f.manager.create(spec)
            } catch {
                #expect(error.field == field, "\(spec)")
            }
        }
        #expect(f.driver.calls(.openQueue) == 0)
        // One range for both kinds.
        #expect(throws: ManagerError.self) { try f.manager.create(DeviceSpec(name: "t", kind: .tun, mtu: 65522)) }
        _ = try f.manager.create(DeviceSpec(name: "t", kind: .tun, mtu: 65521))
    }

    @Test("queue ids start at 0 and a new queue takes the smallest free id")
    func stableIDs() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 4))
        try f.manager.removeQueue("d", id: 1)
        try f.manager.removeQueue("d", id: 2)
        #expect(try f.manager.device("d").queues.map(\.id) == [0, 3])
        let added = try f.manager.addQueues("d", count: 3)
        #expect(added.map(\.id) == [1, 2, 4])
        #expect(try f.manager.device("d").queues.map(\.id) == [0, 1, 2, 3, 4])
    }

    @Test("queues go to the least-loaded worker")
    func leastLoaded() throws {
        let f = try FakeFixture(workers: 3)
        let d = try f.manager.create(DeviceSpec(name: "d", queues: 5))
        #expect(d.queues.map(\.worker) == [0, 1, 2, 0, 1])
        try f.manager.removeQueue("d", id: 0)
        try f.manager.removeQueue("d", id: 3)
        let added = try f.manager.addQueues("d", count: 2)
        #expect(added.map(\.worker) == [0, 0])
    }

    @Test("limits: per device, global, and the kernel's E2BIG, all as queue_limit_exceeded")
    func limits() throws {
        let f = try FakeFixture(maxQueues: 8)
        #expect(throws: ManagerError.queueLimitExceeded(device: "d", limit: 8, requested: 9, errno: nil)) {
            try f.manager.create(DeviceSpec(name: "d", queues: 9))
        }
        #expect(throws: ManagerError.aboveGlobalLimit(field: "max_queues", value: 9, limit: 8)) {
            try f.manager.create(DeviceSpec(name: "d", maxQueues: 9))
        }
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2, maxQueues: 3))
        _ = try f.manager.addQueues("d")
        #expect(throws: ManagerError.queueLimitExceeded(device: "d", limit: 3, requested: 4, errno: nil, field: "count")) {
            try f.manager.addQueues("d")
        }
        // Detached queues count too.
        _ = try f.manager.setQueueEnabled("d", id: 0, false)
        #expect(throws: ManagerError.queueLimitExceeded(device: "d", limit: 3, requested: 4, errno: nil, field: "count")) {
            try f.manager.addQueues("d")
        }
        #expect(f.driver.calls(.openQueue) == 3)
        // The kernel's own refusal keeps its errno.
        _ = try f.manager.update("d", DevicePatch(maxQueues: 8))
        f.driver.fail(.openQueue, with: .tooBig)
        #expect(throws: ManagerError.queueLimitExceeded(device: "d", limit: 256, requested: 4, errno: .tooBig)) {
            try f.manager.addQueues("d")
        }
        #expect(try f.manager.device("d").queueCount == 3)
    }

    @Test("limit_below_usage for the global limit and a device's max_queues; the global caps devices")
    func limitBelowUsage() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "a", queues: 3))
        _ = try f.manager.create(DeviceSpec(name: "b", queues: 5))
        #expect(throws: ManagerError.limitBelowUsage(field: "max_queues", limit: 4, device: "b", inUse: 5)) {
            try f.manager.setLimit(maxQueues: 4)
        }
        #expect(f.manager.limits().maxQueues == 256)
        #expect(throws: ManagerError.limitBelowUsage(field: "max_queues", limit: 2, device: "a", inUse: 3)) {
            try f.manager.update("a", DevicePatch(maxQueues: 2))
        }
        let l = try f.manager.setLimit(maxQueues: 6)
        #expect(l.maxQueues == 6 && l.devices == 2 && l.queuesInUse == 8 && l.kernelMaxQueues == 256)
        #expect(try f.manager.device("a").maxQueues == 6)
        #expect {
            try f.manager.update("a", DevicePatch(maxQueues: 7))
        } throws: { ($0 as? ManagerError)?.field == "max_queues" }
        #expect(throws: ManagerError.invalidField(field: "max_queues", reason: "must be between 1 and 256")) {
            try f.manager.setLimit(maxQueues: 0)
        }
    }

    @Test("last_queue: the last queue cannot be removed; a missing one is not found")
    func lastQueue() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        try f.manager.removeQueue("d", id: 0)
        #expect(throws: ManagerError.lastQueue(device: "d", id: 1)) { try f.manager.removeQueue("d", id: 1) }
        #expect(throws: ManagerError.queueNotFound(device: "d", id: 0)) { try f.manager.removeQueue("d", id: 0) }
        #expect(throws: ManagerError.deviceNotFound(name: "x")) { try f.manager.removeQueue("x", id: 0) }
        #expect(f.driver.fds(of: "d").count == 1)
    }

    @Test("EBUSY on the first open is a name conflict; nothing is left")
    func nameConflict() throws {
        let f = try FakeFixture()
        #expect(throws: ManagerError.nameConflict(name: "lo", errno: .busy)) {
            try f.manager.create(DeviceSpec(name: "lo"))
        }
        _ = try f.manager.create(DeviceSpec(name: "d"))
        #expect(throws: ManagerError.nameConflict(name: "d", errno: nil)) { try f.manager.create(DeviceSpec(name: "d")) }
        #expect(f.driver.openFDs == 1)
    }

    @Test("a failure at any step of create rolls back everything",
          arguments: [
            (FakeDriver.Op.openQueue, 3, Errno.tooManyOpenFiles),
            (.openQueue, 1, .fileTableFull),
            (.openQueue, 2, .invalidArgument),
            (.setMAC, 0, .invalidArgument),
            (.setMTU, 0, .invalidArgument),
            (.setPersist, 0, .notPermitted),
            (.setUp, 0, .noMemory),
            (.link, 0, .noDevice),
          ])
    func createRollback(op: FakeDriver.Op, after: Int, errno: Errno) throws {
        let f = try FakeFixture()
        f.driver.fail(op, with: errno, after: after)
        let spec = DeviceSpec(name: "d", queues: 6, persist: true, mtu: 9000, mac: MACAddress("02:00:00:00:00:09"))
        #expect {
            try f.manager.create(spec)
        } throws: { error in
            guard let e = error as? ManagerError, e.errno == errno else { return false }
            switch errno {
            case .tooManyOpenFiles, .fileTableFull, .noMemory:
                if case .resourceExhausted = e { return true }
                return false
            default:
                if case .kernel = e { return true }
                return false
            }
        }
        #expect(f.driver.openFDs == 0, "every fd is closed")
        #expect(f.driver.device("d") == nil, "no device remains (persist cleared)")
        #expect(f.manager.devices().isEmpty)
        // And the same create works afterwards.
        _ = try f.manager.create(spec)
        #expect(f.driver.openFDs == 6)
    }

    @Test("a failed add-queue closes what it opened and leaves the device as it was")
    func addRollback() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        f.driver.fail(.openQueue, with: .tooManyOpenFiles, after: 2)
        #expect(throws: ManagerError.resourceExhausted(device: "d", step: .openQueue, call: "open(/dev/net/tun)", errno: .tooManyOpenFiles)) {
            try f.manager.addQueues("d", count: 4)
        }
        #expect(f.driver.openFDs == 2)
        #expect(try f.manager.device("d").queues.map(\.id) == [0, 1])
        #expect(try f.manager.addQueues("d", count: 4).map(\.id) == [2, 3, 4, 5])
    }

    @Test("a refused detach keeps the queue polled; a refused attach keeps it detached")
    func detachFailures() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        f.driver.fail(.setQueue, with: .invalidArgument)
        #expect(throws: ManagerError.kernel(device: "d", step: .detachQueue, call: "ioctl(TUNSETQUEUE)", errno: .invalidArgument)) {
            try f.manager.setQueueEnabled("d", id: 1, false)
        }
        #expect(try f.manager.queue("d", id: 1).enabled)
        let fd = f.driver.fds(of: "d")[1]
        inject(f.driver.peer(of: fd)!, [UInt8](repeating: 1, count: 60))
        #expect(eventually { (try? f.manager.queue("d", id: 1).counters.rxPackets) == 1 }, "still polled")

        _ = try f.manager.setQueueEnabled("d", id: 1, false)
        f.driver.fail(.setQueue, with: .invalidArgument)
        #expect(throws: ManagerError.self) { try f.manager.setQueueEnabled("d", id: 1, true) }
        #expect(try !f.manager.queue("d", id: 1).enabled)
        #expect(try f.manager.setQueueEnabled("d", id: 1, true).enabled)
    }

    @Test("a refused PATCH undoes the fields it had already applied")
    func patchRollback() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", up: false))
        f.driver.fail(.setMTU, with: .invalidArgument)
        #expect(throws: ManagerError.self) { try f.manager.update("d", DevicePatch(up: true, mtu: 2000)) }
        #expect(f.driver.device("d")?.up == false)
        #expect(try !f.manager.device("d").up)
        let d = try f.manager.update("d", DevicePatch(up: true, mtu: 2000, mode: .echo))
        #expect(d.up && d.mtu == 2000 && d.mode == .echo)
    }

    @Test("up and mtu read back as the kernel has them; a PATCH puts back what changed behind the back")
    func linkBehindBack() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d"))
        // What `ip link set d down mtu 9000` does: the driver changed, not through the manager.
        try f.driver.setUp("d", false)
        try f.driver.setMTU("d", 9000)
        let seen = try f.manager.device("d")
        #expect(!seen.up && seen.mtu == 9000)
        #expect(f.manager.devices().map { [$0.up ? 1 : 0, $0.mtu] } == [[0, 9000]])

        // The recorded values were up and 1500: a PATCH to them must still reach the kernel.
        let sets = (f.driver.calls(.setUp), f.driver.calls(.setMTU))
        let back = try f.manager.update("d", DevicePatch(up: true, mtu: 1500))
        #expect(back.up && back.mtu == 1500)
        #expect(f.driver.device("d")?.up == true && f.driver.device("d")?.mtu == 1500)
        #expect((f.driver.calls(.setUp), f.driver.calls(.setMTU)) == (sets.0 + 1, sets.1 + 1))

        // A PATCH to what the kernel already has asks nothing of it, but is recorded.
        try f.driver.setMTU("d", 4000)
        let mtuSets = f.driver.calls(.setMTU)
        #expect(try f.manager.update("d", DevicePatch(mtu: 4000)).mtu == 4000)
        #expect(f.driver.calls(.setMTU) == mtuSets)
        // A PATCH of another field reports the kernel's values too.
        try f.driver.setUp("d", false)
        #expect(try !f.manager.update("d", DevicePatch(mode: .echo)).up)
    }

    @Test("delete: persistent devices are cleared; unknown names are not found")
    func delete() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "p", queues: 3, persist: true))
        #expect(f.driver.device("p")?.persist == true)
        f.driver.fail(.setPersist, with: .notPermitted)
        #expect(throws: ManagerError.kernel(device: "p", step: .setPersist, call: "ioctl(TUNSETPERSIST)", errno: .notPermitted)) {
            try f.manager.delete("p")
        }
        #expect(f.driver.openFDs == 3, "a refused delete changes nothing")
        try f.manager.delete("p")
        #expect(f.driver.device("p") == nil)
        #expect(f.driver.openFDs == 0)
        #expect(throws: ManagerError.deviceNotFound(name: "p")) { try f.manager.delete("p") }
    }

    @Test("shutdown closes every fd but keeps persistent devices")
    func shutdown() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "p", queues: 2, persist: true))
        _ = try f.manager.create(DeviceSpec(name: "t", queues: 2))
        f.manager.shutdown()
        #expect(f.driver.openFDs == 0)
        #expect(f.driver.device("p") != nil)
        #expect(f.driver.device("t") == nil)
    }

    @Test("16 concurrent creates of one name: exactly one wins, the rest conflict")
    func concurrentCreates() throws {
        let f = try FakeFixture()
        let wins = Mutex(0)
        let conflicts = Mutex(0)
        let manager = f.manager
        DispatchQueue.concurrentPerform(iterations: 16) { _ in
            do {
                _ = try manager.create(DeviceSpec(name: "race", queues: 2))
                wins.withLock { $0 += 1 }
            } catch ManagerError.nameConflict {
                conflicts.withLock { $0 += 1 }
            } catch {}
        }
        #expect(wins.withLock { $0 } == 1)
        #expect(conflicts.withLock { $0 } == 15)
        #expect(f.driver.openFDs == 2)
    }

    @Test("16 concurrent add-queue calls never pass max_queues")
    func concurrentAdds() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", maxQueues: 10))
        let manager = f.manager
        DispatchQueue.concurrentPerform(iterations: 16) { _ in _ = try? manager.addQueues("d") }
        #expect(try f.manager.device("d").queues.map(\.id) == Array(0..<10))
        #expect(f.driver.openFDs == 10)
    }
}

@Suite("workers and counters over real fds (fake driver, no root)")
struct WorkerTests {
    static let frame: [UInt8] = Array(0..<6) + Array(10..<16) + [0x08, 0x00] + [UInt8](repeating: 7, count: 46)

    @Test("sink counts every frame per queue, exactly")
    func sink() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 3))
        let fds = f.driver.fds(of: "d")
        for (i, fd) in fds.enumerated() {
            for _ in 0..<(10 * (i + 1)) { #expect(inject(f.driver.peer(of: fd)!, Self.frame)) }
        }
        #expect(eventually { (try? f.manager.stats("d").total.rxPackets) == 60 })
        let s = try f.manager.stats("d")
        #expect(s.queues.map(\.counters.rxPackets) == [10, 20, 30])
        #expect(s.queues.map(\.counters.rxBytes) == [600, 1200, 1800])
        #expect(s.total.txPackets == 0)
    }

    @Test("echo writes each frame back to its queue with the MACs swapped (TAP)")
    func echoTap() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2, mode: .echo))
        let fd = f.driver.fds(of: "d")[1]
        let peer = f.driver.peer(of: fd)!
        inject(peer, Self.frame)
        var back: [UInt8]?
        #expect(eventually { back = receive(peer); return back != nil })
        #expect(back.map { Array($0[0..<6]) } == Array(10..<16))
        #expect(back.map { Array($0[6..<12]) } == Array(0..<6))
        #expect(back.map { Array($0[12...]) } == Array(Self.frame[12...]))
        let q = try f.manager.queue("d", id: 1).counters
        #expect(q.rxPackets == 1 && q.txPackets == 1 && q.txBytes == 60 && q.txErrors == 0)
        #expect(try f.manager.queue("d", id: 0).counters == CounterValues())
    }

    @Test("echo on TUN and with vnet_hdr: untouched, and the MACs after the 10-byte header")
    func echoTunAndVnet() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "t", kind: .tun, mode: .echo))
        let tun = f.driver.peer(of: f.driver.fds(of: "t")[0])!
        inject(tun, Self.frame)
        var back: [UInt8]?
        #expect(eventually { back = receive(tun); return back != nil })
        #expect(back == Self.frame)

        _ = try f.manager.create(DeviceSpec(name: "v", vnetHdr: true, mode: .echo))
        let vnet = f.driver.peer(of: f.driver.fds(of: "v")[0])!
        let withHeader = [UInt8](repeating: 0xee, count: 10) + Self.frame
        inject(vnet, withHeader)
        #expect(eventually { back = receive(vnet); return back != nil })
        #expect(back.map { Array($0[0..<10]) } == [UInt8](repeating: 0xee, count: 10))
        #expect(back.map { Array($0[10..<16]) } == Array(10..<16))
    }

    @Test("mode changes at run time reach the workers")
    func modeChange() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d"))
        let peer = f.driver.peer(of: f.driver.fds(of: "d")[0])!
        _ = try f.manager.update("d", DevicePatch(mode: .echo))
        inject(peer, Self.frame)
        #expect(eventually { receive(peer) != nil })
        _ = try f.manager.update("d", DevicePatch(mode: .sink))
        inject(peer, Self.frame)
        #expect(eventually { (try? f.manager.stats("d").total.rxPackets) == 2 })
        #expect(try f.manager.stats("d").total.txPackets == 1)
    }

    @Test("a disabled queue is not read; its frames wait for re-enable")
    func disabledQueueNotRead() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        let peer = f.driver.peer(of: f.driver.fds(of: "d")[1])!
        _ = try f.manager.setQueueEnabled("d", id: 1, false)
        for _ in 0..<5 { inject(peer, Self.frame) }
        inject(f.driver.peer(of: f.driver.fds(of: "d")[0])!, Self.frame)
        #expect(eventually { (try? f.manager.queue("d", id: 0).counters.rxPackets) == 1 })
        #expect(try f.manager.queue("d", id: 1).counters.rxPackets == 0)
        _ = try f.manager.setQueueEnabled("d", id: 1, true)
        #expect(eventually { (try? f.manager.queue("d", id: 1).counters.rxPackets) == 5 })
    }

    @Test("a vanished device is dropped by the workers' report alone, its fds closed")
    func vanished() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 3))
        _ = try f.manager.create(DeviceSpec(name: "e", queues: 1))
        f.driver.vanish("d")
        #expect(eventually(within: 1) { f.manager.limits().devices == 1 })
        #expect(f.driver.openFDs == 1)
        #expect(throws: ManagerError.deviceNotFound(name: "d")) { try f.manager.device("d") }
        _ = try f.manager.create(DeviceSpec(name: "d"))
    }

    // The two lines' layout (128 bytes, tx at 64) is checked where it is defined, by
    // _Static_assert in CCounters.h: a distance between allocations could not show it.
    @Test("counter blocks are cache-line aligned")
    func alignment() {
        let blocks = (0..<16).map { _ in CounterBlock() }
        for b in blocks { #expect(b.address % 64 == 0) }
    }
}

@Suite("errno names")
struct ErrnoTests {
    @Test func names() {
        #expect(Errno.tooBig.name == "E2BIG")
        #expect(Errno.busy.name == "EBUSY")
        #expect(Errno.tooManyOpenFiles.name == "EMFILE")
        #expect(Errno.badFileDescriptorState.name == "EBADFD")
        #expect(Errno(9999).name == "E9999")
        #expect(SyscallError(call: "ioctl(TUNSETIFF)", errno: .busy).description.hasPrefix("ioctl(TUNSETIFF): EBUSY"))
    }

    @Test func macParsing() {
        #expect(MACAddress("02:aB:00:ff:10:0a")?.description == "02:ab:00:ff:10:0a")
        #expect(MACAddress("02:ab:00:ff:10") == nil)
        #expect(MACAddress("02:ab:00:ff:10:0g") == nil)
        #expect(MACAddress("2:ab:00:ff:10:0a") == nil)
    }
}
