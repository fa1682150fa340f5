import Foundation
import TapCore
import TapJSON
import TapTestSupport
import Testing
import TunKit

/// A temporary state directory, removed afterwards.
final class StateDir {
    let path: String

    init() {
        path = NSTemporaryDirectory() + "mqtapd-state-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    var file: StateFile { StateFile(directory: path) }
    var saved: DesiredState? { try? file.load() }
}

@Suite("state file and restore (fake driver, no root)")
struct RestoreTests {
    @Test("every accepted change is in the state file when the call returns")
    func savedOnEveryChange() throws {
        let dir = StateDir()
        let driver = FakeDriver()
        let m = try DeviceManager(driver: driver, workers: 2, stateFile: dir.file)
        defer { m.shutdown() }
        _ = try m.create(DeviceSpec(name: "a", queues: 3, mode: .echo))
        #expect(dir.saved?.devices.map(\.spec.name) == ["a"])
        #expect(dir.saved?.devices.first?.queues.map(\.id) == [0, 1, 2])
        try m.removeQueue("a", id: 1)
        _ = try m.setQueueEnabled("a", id: 2, false)
        #expect(dir.saved?.devices.first?.queues == [.init(id: 0, enabled: true), .init(id: 2, enabled: false)])
        _ = try m.update("a", DevicePatch(maxQueues: 9, mode: .sink))
        #expect(dir.saved?.devices.first?.spec.maxQueues == 9)
        #expect(dir.saved?.devices.first?.spec.mode == .sink)
        _ = try m.setLimit(maxQueues: 50)
        #expect(dir.saved?.maxQueues == 50)
        // A refused change writes nothing new.
        let before = try Files.read(dir.file.path)
        #expect(throws: ManagerError.self) { try m.addQueues("a", count: 100) }
        #expect(try Files.read(dir.file.path) == before)
        try m.delete("a")
        #expect(dir.saved?.devices == [])
        #expect(!Files.exists(dir.file.path + ".tmp"))
    }

    @Test("after a crash: persistent devices re-attached, others made again, all as they were")
    func restoreAfterCrash() throws {
        let dir = StateDir()
        do {
            let m = try DeviceManager(driver: FakeDriver(), workers: 2, maxQueues: 100, stateFile: dir.file)
            _ = try m.create(DeviceSpec(name: "p", queues: 3, maxQueues: 5, persist: true, mode: .echo))
            _ = try m.setQueueEnabled("p", id: 1, false)
            _ = try m.create(DeviceSpec(name: "n", queues: 3, mtu: 9000))
            try m.removeQueue("n", id: 1)
            m.shutdown()
        }
        // The kernel after the crash: the persistent device is there with no queues.
        let driver = FakeDriver()
        driver.leavePersistent("p", flags: [.tap, .noPI, .multiQueue])
        let m = try DeviceManager(driver: driver, workers: 2, stateFile: dir.file)
        defer { m.shutdown() }
        let desired = try #require(try dir.file.load())
        #expect(m.restore(desired) == [])
        let p = try m.device("p")
        #expect(p.status == .active && p.persist && p.mode == .echo && p.maxQueues == 5)
        #expect(p.queues.map(\.id) == [0, 1, 2])
        #expect(p.queues.map(\.enabled) == [true, false, true])
        let n = try m.device("n")
        #expect(n.queues.map(\.id) == [0, 2] && n.mtu == 9000 && !n.persist)
        #expect(m.limits().maxQueues == 100)
        #expect(driver.fds(of: "p").count == 3)
        #expect(driver.device("p")?.detached.count == 1)
        // Counters restart, and say since when.
        #expect(p.queues.allSatisfy { $0.counters == CounterValues() && $0.since?.isEmpty == false })
        #expect(dir.saved == desired)
    }

    @Test("a device whose flags or name no longer match is reported and left untouched; the others come back")
    func conflicts() throws {
        let dir = StateDir()
        try dir.file.save(DesiredState(maxQueues: 256, devices: [
            .init(spec: DeviceSpec(name: "flags", queues: 2, persist: true), queues: [.init(id: 0, enabled: true), .init(id: 1, enabled: true)]),
            .init(spec: DeviceSpec(name: "eth9"), queues: [.init(id: 0, enabled: true)]),
            .init(spec: DeviceSpec(name: "held"), queues: [.init(id: 0, enabled: true)]),
            .init(spec: DeviceSpec(name: "ok", queues: 1), queues: [.init(id: 4, enabled: true)]),
        ]))
        let driver = FakeDriver()
        driver.leavePersistent("flags", flags: [.tap, .noPI, .multiQueue, .vnetHdr])
        driver.addForeign("eth9")
        _ = try driver.openQueue(name: "held", flags: .multiqueue(.tap, vnetHdr: false))
        let m = try DeviceManager(driver: driver, workers: 1, stateFile: dir.file)
        defer { m.shutdown() }
        let problems = m.restore(try #require(try dir.file.load()))
        #expect(problems.count == 3)
        let flags = try m.device("flags")
        #expect(flags.status.name == "conflict")
        #expect(flags.status.reason?.contains("tun_flags") == true)
        #expect(driver.fds(of: "flags").isEmpty, "nothing attached to a mismatched device")
        #expect(try m.device("eth9").status.name == "conflict")
        #expect(try m.device("held").status.name == "conflict")
        #expect(driver.fds(of: "held").count == 1, "someone else's device is not joined")
        #expect(try m.device("ok").queues.map(\.id) == [4])
        // A device that is not managed refuses changes, and DELETE only forgets it.
        #expect(throws: ManagerError.self) { try m.addQueues("flags") }
        #expect(throws: ManagerError.self) { try m.stats("flags") }
        try m.delete("flags")
        #expect(driver.device("flags") != nil, "forgetting touches nothing in the kernel")
        #expect(dir.saved?.devices.map(\.spec.name) == ["eth9", "held", "ok"], "the others stay desired")
        #expect(m.limits().queuesInUse == 1)
    }

    @Test("a device deleted behind the back leaves the state file and is not made again")
    func vanishedIsForgotten() throws {
        let dir = StateDir()
        let driver = FakeDriver()
        let m = try DeviceManager(driver: driver, workers: 1, stateFile: dir.file)
        _ = try m.create(DeviceSpec(name: "v", queues: 2))
        _ = try m.create(DeviceSpec(name: "w"))
        driver.vanish("v")
        #expect(eventually(within: 1) { dir.saved?.devices.map(\.spec.name) == ["w"] })
        m.shutdown()
    }

    @Test("a corrupt state file is refused with where it broke, and set aside")
    func corrupt() throws {
        let dir = StateDir()
        try Files.writeAtomically(dir.file.path, Array("{\"version\":1,\n\"devices\":[}".utf8))
        #expect(throws: StateFile.LoadError.self) { try dir.file.load() }
        do {
            _ = try dir.file.load()
        } catch {
            guard case .corrupt(let why) = error else { Issue.record("\(error)"); return }
            #expect(why.contains("line 2"))
        }
        let aside = try dir.file.setAside(stamp: "T")
        #expect(Files.exists(aside) && !Files.exists(dir.file.path))
        #expect(try dir.file.load() == nil)
        for bad in [#"{"version":2,"max_queues":1,"devices":[]}"#, #"{"version":1,"max_queues":0,"devices":[]}"#,
                    #"{"version":1,"max_queues":4,"devices":[{"name":"a"}]}"#, "[]"] {
            try Files.writeAtomically(dir.file.path, Array(bad.utf8))
            #expect(throws: StateFile.LoadError.self) { try dir.file.load() }
        }
    }

    @Test("a state file that cannot be written fails the call with resource_exhausted-style error")
    func notSaved() throws {
        let driver = FakeDriver()
        let m = try DeviceManager(driver: driver, workers: 1, stateFile: StateFile(directory: "/nonexistent/mqtapd"))
        defer { m.shutdown() }
        #expect {
            try m.create(DeviceSpec(name: "a"))
        } throws: { error in
            guard case .stateNotSaved(_, _, .noSuchFile)? = error as? ManagerError else { return false }
            return true
        }
    }

    @Test("the state file round-trips")
    func roundTrip() throws {
        let dir = StateDir()
        let s = DesiredState(maxQueues: 17, devices: [
            .init(spec: DeviceSpec(name: "a", kind: .tun, queues: 2, maxQueues: 9, persist: true, vnetHdr: true,
                                   mtu: 1400, up: false, mode: .echo),
                  queues: [.init(id: 0, enabled: false), .init(id: 3, enabled: true)]),
            .init(spec: DeviceSpec(name: "b", queues: 1, maxQueues: 17, mac: MACAddress("02:00:00:00:00:07")),
                  queues: [.init(id: 0, enabled: true)]),
        ])
        try dir.file.save(s)
        #expect(try dir.file.load() == s)
    }
}
