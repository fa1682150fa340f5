import Foundation
import TapCore
import TapTestSupport
import Testing
import TunKit

@Suite("device lifecycle on the real kernel", .serialized, privileged)
struct LifecycleTests {
    @Test("privileged tests really run where CI says they must")
    func privilegesPresentInCI() throws {
        if Privilege.inCI {
            #expect(Privilege.available, "CI=true but this process lacks root or /dev/net/tun")
        }
    }

    @Test("create with 1, 4 and 256 queues: the kernel shows multi_queue and the count",
          arguments: [1, 4, 256])
    func createWithQueues(_ queues: Int) throws {
        let f = try Fixture()
        let name = f.name("c")
        _ = Host.linkDetails(name)  // warm up Foundation's Process machinery before counting fds
        let fdsBefore = ProcessResources.openFileCount()
        let tunBefore = tunFDs()
        let dev = try f.manager.create(DeviceSpec(name: name, queues: queues))
        #expect(dev.queueCount == queues)
        #expect(dev.queues.map(\.id) == Array(0..<queues))
        let details = try #require(Host.linkDetails(name))
        #expect(details.contains("multi_queue"))
        #expect(details.contains("tun type tap pi off vnet_hdr off multi_queue"))
        #expect(Host.kernelQueueCount(name) == queues)
        #expect(tunFDs() == tunBefore + queues)
        #expect(fdsSettle(at: fdsBefore + queues))
        // The workers share the queues evenly.
        let perWorker = Dictionary(grouping: dev.queues, by: \.worker).mapValues(\.count)
        #expect(perWorker.values.max()! - perWorker.values.min()! <= 1)

        try f.manager.delete(name)
        #expect(!Host.exists(name))
        #expect(tunFDs() == tunBefore)
        #expect(fdsSettle(at: fdsBefore))
    }

    @Test("the 257th queue is refused with queue_limit_exceeded and nothing leaks")
    func queue257() throws {
        let f = try Fixture()
        let name = f.name("l")
        _ = try f.manager.create(DeviceSpec(name: name, queues: 256))
        let fds = ProcessResources.openFileCount()
        let tun = tunFDs()
        #expect(throws: ManagerError.queueLimitExceeded(device: name, limit: 256, requested: 257, errno: nil, field: "count")) {
            try f.manager.addQueues(name, count: 1)
        }
        #expect(fdsSettle(at: fds))
        #expect(tunFDs() == tun)
        #expect(Host.kernelQueueCount(name) == 256)
        // The kernel's own refusal, reached by joining the device from outside the manager's
        // bookkeeping, is the same error with its errno.
        #expect {
            _ = try Tun.openQueue(name: name, flags: .multiqueue(.tap, vnetHdr: false))
        } throws: { ($0 as? SyscallError)?.errno == .tooBig }
        #expect(fdsSettle(at: fds))
        #expect(tunFDs() == tun)
        try f.manager.delete(name)
    }

    @Test("a lowered global limit is enforced before the kernel is asked")
    func loweredLimit() throws {
        let f = try Fixture()
        let name = f.name("m")
        _ = try f.manager.create(DeviceSpec(name: name, queues: 3))
        #expect(throws: ManagerError.limitBelowUsage(field: "max_queues", limit: 2, device: name, inUse: 3)) {
            try f.manager.setLimit(maxQueues: 2)
        }
        _ = try f.manager.setLimit(maxQueues: 4)
        _ = try f.manager.addQueues(name, count: 1)
        #expect(throws: ManagerError.queueLimitExceeded(device: name, limit: 4, requested: 5, errno: nil, field: "count")) {
            try f.manager.addQueues(name, count: 1)
        }
        #expect(Host.kernelQueueCount(name) == 4)
        try f.manager.delete(name)
    }

    @Test("an existing interface name is a conflict, never joined")
    func nameConflict() throws {
        let f = try Fixture()
        let fds = ProcessResources.openFileCount()
        let tun = tunFDs()
        #expect(throws: ManagerError.nameConflict(name: "lo", errno: .busy)) {
            try f.manager.create(DeviceSpec(name: "lo"))
        }
        let name = f.name("n")
        _ = try f.manager.create(DeviceSpec(name: name, queues: 2))
        #expect(throws: ManagerError.nameConflict(name: name, errno: nil)) {
            try f.manager.create(DeviceSpec(name: name))
        }
        // A tap made outside the daemon is not joined either.
        let foreign = f.name("x")
        #expect(Host.run(["ip", "tuntap", "add", "dev", foreign, "mode", "tap", "multi_queue"]).status == 0)
        #expect(throws: ManagerError.nameConflict(name: foreign, errno: .busy)) {
            try f.manager.create(DeviceSpec(name: foreign))
        }
        #expect(Host.kernelQueueCount(foreign) == 0)
        try f.manager.delete(name)
        Host.deleteLink(foreign)
        #expect(fdsSettle(at: fds))
        #expect(tunFDs() == tun)
    }

    @Test("out of fds half-way (EMFILE): reported, no device remains, fd count restored")
    func emfileRollback() throws {
        let f = try Fixture()
        let name = f.name("e")
        let fds = ProcessResources.openFileCount()
        let tun = tunFDs()
        let limit = ProcessResources.fileLimit()
        // Room for a few queues, not for 32: the open of a later queue fails with EMFILE.
        try ProcessResources.setFileLimit(soft: fileLimitLeaving(free: 5))
        defer { try? ProcessResources.setFileLimit(soft: limit.soft) }
        #expect {
            try f.manager.create(DeviceSpec(name: name, queues: 32))
        } throws: { error in
            // The open of the queue, or the look at its device's namespace just before it
            // (TUNGETDEVNETNS makes an fd too): whichever needs the fd that is not there.
            guard case .resourceExhausted(name, .openQueue, let call, .tooManyOpenFiles)? = error as? ManagerError
            else { return false }
            return call == "open(/dev/net/tun)" || call == "ioctl(TUNGETDEVNETNS)"
        }
        try ProcessResources.setFileLimit(soft: limit.soft)
        #expect(!Host.exists(name))
        #expect(fdsSettle(at: fds))
        #expect(tunFDs() == tun)
        #expect(throws: ManagerError.deviceNotFound(name: name)) { try f.manager.device(name) }

        // Same for adding queues to a live device: the device keeps what it had.
        _ = try f.manager.create(DeviceSpec(name: name, queues: 2))
        let withDevice = ProcessResources.openFileCount()
        let tunWithDevice = tunFDs()
        try ProcessResources.setFileLimit(soft: fileLimitLeaving(free: 5))
        #expect(throws: ManagerError.self) { try f.manager.addQueues(name, count: 16) }
        try ProcessResources.setFileLimit(soft: limit.soft)
        #expect(fdsSettle(at: withDevice))
        #expect(tunFDs() == tunWithDevice)
        #expect(Host.kernelQueueCount(name) == 2)
        #expect(try f.manager.device(name).queues.map(\.id) == [0, 1])
        try f.manager.delete(name)
    }

    @Test("200 create/delete cycles leave the fd count unchanged")
    func cycles() throws {
        let f = try Fixture()
        let name = f.name("y")
        _ = try f.manager.create(DeviceSpec(name: name, queues: 4))
        try f.manager.delete(name)
        let fds = ProcessResources.openFileCount()
        let tun = tunFDs()
        for i in 0..<200 {
            _ = try f.manager.create(DeviceSpec(name: name, queues: 1 + i % 4))
            if i % 3 == 0 { _ = try f.manager.addQueues(name, count: 2) }
            if try f.manager.device(name).queueCount > 1 { try f.manager.removeQueue(name, id: 0) }
            try f.manager.delete(name)
        }
        #expect(fdsSettle(at: fds), "\(fdTable())")
        #expect(tunFDs() == tun)
        #expect(!Host.exists(name))
        #expect(f.manager.limits().devices == 0)
    }

    @Test("ip link del behind the manager's back is noticed within a second; the name is free again")
    func deletedBehindBack() throws {
        let f = try Fixture()
        let fds = ProcessResources.openFileCount()
        let tun = tunFDs()
        let dev = try f.quietDevice(queues: 4)
        _ = try f.manager.setQueueEnabled(dev.name, id: 1, false)
        #expect(Host.run(["ip", "link", "del", "dev", dev.name]).status == 0)
        // Noticed by the workers (POLLERR), not by the next request: watch the published list.
        #expect(eventually(within: 1) { f.manager.limits().devices == 0 })
        #expect(fdsSettle(at: fds), "the vanished device's fds are closed")
        #expect(tunFDs() == tun)
        #expect(throws: ManagerError.deviceNotFound(name: dev.name)) { try f.manager.device(dev.name) }
        // Nothing spins: the workers are idle again.
        let again = try f.manager.create(DeviceSpec(name: dev.name, queues: 2))
        #expect(again.queueCount == 2)
        #expect(Host.kernelQueueCount(dev.name) == 2)
        try f.manager.delete(dev.name)
        #expect(fdsSettle(at: fds))
        #expect(tunFDs() == tun)
    }

    @Test("persist: the device outlives the manager; delete clears it")
    func persistent() throws {
        let name: String
        do {
            let f = try Fixture()
            name = f.name("p")
            _ = try f.manager.create(DeviceSpec(name: name, queues: 2, persist: true))
            f.manager.shutdown()
            #expect(Host.exists(name), "a persistent device stays after its fds close")
            #expect(try Link.tunFlags(name)?.contains(.persist) == true)
            let f2 = try Fixture()
            // Ours or not, the name is taken now.
            #expect(throws: ManagerError.nameConflict(name: name, errno: .busy)) {
                try f2.manager.create(DeviceSpec(name: name))
            }
        }
        #expect(!Host.exists(name), "the fixture's cleanup removed it")
        let f = try Fixture()
        let n = f.name("p")
        _ = try f.manager.create(DeviceSpec(name: n, persist: true))
        try f.manager.delete(n)
        #expect(!Host.exists(n), "delete clears IFF_PERSIST before closing")
    }

    @Test("settings reach the kernel: MTU, MAC, link state, TUN type, vnet_hdr")
    func settings() throws {
        let f = try Fixture()
        let name = f.name("s")
        let mac = MACAddress("02:11:22:33:44:55")!
        let dev = try f.manager.create(DeviceSpec(name: name, queues: 2, vnetHdr: true, mtu: 9000, mac: mac, up: false))
        #expect(dev.mtu == 9000)
        #expect(dev.mac == mac)
        #expect(try Link.mac(name) == mac.bytes)
        #expect(try Link.mtu(name) == 9000)
        #expect(try !Link.isUp(name))
        #expect(dev.ifindex == (try Link.ifindex(name)))
        #expect(try Link.tunFlags(name) == [.tap, .noPI, .multiQueue, .vnetHdr])
        let up = try f.manager.update(name, DevicePatch(up: true, mtu: 1400))
        #expect(up.up && up.mtu == 1400)
        #expect(try Link.isUp(name))
        #expect(try Link.mtu(name) == 1400)
        // A refused change leaves the device as it was.
        #expect(throws: ManagerError.self) { try f.manager.update(name, DevicePatch(up: false, mtu: 70_000)) }
        #expect(try Link.isUp(name))

        let tun = f.name("u")
        let t = try f.manager.create(DeviceSpec(name: tun, kind: .tun, queues: 3))
        #expect(t.mac == nil)
        #expect(Host.linkDetails(tun)!.contains("tun type tun"))
        #expect(Host.kernelQueueCount(tun) == 3)
        try f.manager.delete(name)
        try f.manager.delete(tun)
    }

    @Test("ip link changes to up and mtu show in the API; a PATCH puts them back")
    func linkChangedBehindBack() throws {
        let f = try Fixture()
        let dev = try f.quietDevice(queues: 2)
        #expect(Host.run(["ip", "link", "set", "dev", dev.name, "down", "mtu", "9000"]).status == 0)
        let seen = try f.manager.device(dev.name)
        #expect(!seen.up && seen.mtu == 9000)
        let back = try f.manager.update(dev.name, DevicePatch(up: true, mtu: 1500))
        #expect(back.up && back.mtu == 1500)
        #expect(try Link.isUp(dev.name) && Link.mtu(dev.name) == 1500)
    }
}

/// The RLIMIT_NOFILE under which exactly `free` more fds can be opened: the limit bounds fd
/// numbers, not counts, and the lowest free numbers (holes included) are handed out first.
func fileLimitLeaving(free: Int) -> UInt64 {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    let open = Set(names.compactMap(Int.init))
    var found = 0
    var n = 0
    while true {
        if !open.contains(n) {
            found += 1
            if found == free { return UInt64(n + 1) }
        }
        n += 1
    }
}

/// Open fds of this process on /dev/net/tun.
func tunFDs() -> Int {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return names.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) == Tun.devicePath }.count
}

func fdTable() -> [Int: String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    var t: [Int: String] = [:]
    for n in names { t[Int(n)!] = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(n)")) ?? "?" }
    return t
}

/// Whether the process's fd count comes back to at most `baseline` within a second. Test
/// machinery (Foundation, libdispatch) opens and closes fds of its own on other threads,
/// so the count is compared once it settles; a leak never settles. Every test also checks
/// its /dev/net/tun fds exactly.
func fdsSettle(at baseline: Int) -> Bool {
    eventually(within: 2) { ProcessResources.openFileCount() <= baseline }
}
