import Foundation
@testable import TapCore
import TapJSON
import TapTestSupport
import Testing
import TunKit

@Suite("lifecycle, reads that do not write, errors that keep their cause (fake driver, no root)")
struct HouseTests {
    @Test("once stopping, every change is refused with shuttingDown and opens nothing")
    func shuttingDown() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        f.manager.serving()
        #expect(f.manager.state == .serving)
        f.manager.shutdown()
        #expect(f.manager.state == .stopped)
        let opened = f.driver.calls(.openQueue)
        #expect(throws: ManagerError.shuttingDown) { try f.manager.create(DeviceSpec(name: "e")) }
        #expect(throws: ManagerError.shuttingDown) { try f.manager.addQueues("d") }
        #expect(throws: ManagerError.shuttingDown) { try f.manager.setLimit(maxQueues: 9) }
        #expect(throws: ManagerError.shuttingDown) { try f.manager.delete("d") }
        #expect(f.driver.calls(.openQueue) == opened)
        #expect(f.driver.openFDs == 0)
    }

    @Test("a read after the device vanished answers it gone and writes nothing; the event path drops it")
    func readsDoNotWrite() throws {
        let dir = StateDir()
        let driver = FakeDriver()
        let m = try DeviceManager(driver: driver, workers: 2, stateFile: dir.file)
        defer { m.shutdown() }
        _ = try m.create(DeviceSpec(name: "d", queues: 2))
        _ = try m.create(DeviceSpec(name: "e"))
        let saved = try Files.read(dir.file.path)
        // Held: nothing on the event path runs until the reads are done.
        m.reports.suspend()
        driver.vanish("d")
        #expect(throws: ManagerError.deviceNotFound(name: "d")) { try m.device("d") }
        #expect(m.devices().map(\.name) == ["e"])
        #expect(throws: ManagerError.deviceNotFound(name: "d")) { try m.stats("d") }
        _ = m.limits()
        #expect(try Files.read(dir.file.path) == saved, "no read rewrote the state file")
        #expect(driver.openFDs == 3, "no read closed an fd")
        m.reports.resume()
        #expect(eventually(within: 2) { dir.saved?.devices.map(\.spec.name) == ["e"] })
        #expect(eventually(within: 2) { driver.openFDs == 1 })
    }

    @Test("a failed statistics read is reported, not answered as empty")
    func statisticsError() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d"))
        #expect(try f.manager.stats("d").kernel == [:])
        f.driver.failStatistics(.accessDenied)
        let s = try f.manager.stats("d")
        #expect(s.kernel == nil && s.kernelError?.errno == "EACCES")
    }

    @Test("a failed link read is said in the device view, and a limit check refuses rather than count 0 foreign queues")
    func viewAndLimitErrors() throws {
        let f = try FakeFixture()
        _ = try f.manager.create(DeviceSpec(name: "d", queues: 2))
        #expect(try f.manager.device("d").kernelError == nil)
        f.driver.failStatistics(.accessDenied)
        let v = try f.manager.device("d")
        #expect(v.kernelError?.errno == "EACCES", "said, not answered as if read")
        #expect(v.queueCount == 2, "beside the values last recorded")
        // Every check that counts queues others attached needs the kernel's count.
        #expect(throws: ManagerError.kernel(device: "d", step: .countQueues, call: "RTM_GETLINK(d)", errno: .accessDenied)) {
            try f.manager.addQueues("d", count: 1)
        }
        #expect(throws: ManagerError.kernel(device: "d", step: .countQueues, call: "RTM_GETLINK(d)", errno: .accessDenied)) {
            try f.manager.setLimit(maxQueues: 8)
        }
        #expect(try f.manager.queues("d").count == 2, "a refused change changed nothing")
        // A PATCH that checks no limit goes on with the values last recorded; one that does is refused.
        #expect(try f.manager.update("d", DevicePatch(up: true)).up == true)
        #expect(throws: ManagerError.kernel(device: "d", step: .countQueues, call: "RTM_GETLINK(d)", errno: .accessDenied)) {
            try f.manager.update("d", DevicePatch(maxQueues: 8))
        }
        f.driver.failStatistics(nil)
        #expect(try f.manager.addQueues("d", count: 1).count == 1)
        #expect(try f.manager.device("d").kernelError == nil)
    }

    @Test("restore: an unreadable sysfs is a failed device with its errno, not an absent name")
    func inspectError() throws {
        let driver = FakeDriver()
        driver.failInspect(.accessDenied)
        let m = try DeviceManager(driver: driver, workers: 1)
        defer { m.shutdown() }
        let spec = DeviceSpec(name: "p", persist: true)
        let problems = m.restore(DesiredState(maxQueues: 256, devices: [.init(spec: spec, queues: [.init(id: 0, enabled: true)])]))
        #expect(problems.count == 1 && problems[0].contains("EACCES"))
        #expect(try m.device("p").status.name == "failed")
        #expect(driver.calls(.openQueue) == 0)
        #expect(throws: ManagerError.deviceNotActive(name: "p", status: try m.device("p").status)) { try m.addQueues("p") }
    }

    @Test("a restore that fails half-way undoes what it made and keeps the typed error")
    func restoreRollback() throws {
        let driver = FakeDriver()
        driver.fail(.setQueue, with: .invalidArgument, after: 0)
        let m = try DeviceManager(driver: driver, workers: 1)
        defer { m.shutdown() }
        let spec = DeviceSpec(name: "n", queues: 2, persist: true)
        _ = m.restore(DesiredState(maxQueues: 256, devices: [
            .init(spec: spec, queues: [.init(id: 0, enabled: true), .init(id: 1, enabled: false)]),
        ]))
        let d = try m.device("n")
        #expect(d.status.name == "failed" && d.status.reason?.contains("EINVAL") == true)
        #expect(driver.openFDs == 0, "the queues it opened are closed")
        #expect(driver.device("n") == nil, "persistence was cleared, so the made device went")
    }

    @Test("the kernel's features are asked first: a missing one stops the start, or refuses the spec naming its field")
    func features() throws {
        #expect(throws: ManagerError.featureMissing(feature: "IFF_MULTI_QUEUE", field: nil)) {
            _ = try DeviceManager(driver: FakeDriver(features: [.tun, .tap, .noPI]), workers: 1)
        }
        let driver = FakeDriver(features: [.tun, .tap, .noPI, .multiQueue])
        let m = try DeviceManager(driver: driver, workers: 1)
        defer { m.shutdown() }
        #expect(throws: ManagerError.featureMissing(feature: "IFF_VNET_HDR", field: "vnet_hdr")) {
            try m.create(DeviceSpec(name: "v", vnetHdr: true))
        }
        #expect(driver.calls(.openQueue) == 0)
        _ = try m.create(DeviceSpec(name: "p"))
    }

    @Test("rollback runs the undos of the steps that succeeded, in reverse, and only on failure")
    func rollback() {
        var log: [Int] = []
        let ok: Int? = try? withRollback { (r) throws(ManagerError) in
            r.add { log.append(1) }
            return 7
        }
        #expect(ok == 7 && log.isEmpty)
        #expect(throws: ManagerError.lastQueue(device: "d", id: 0)) {
            try withRollback { (r) throws(ManagerError) in
                r.add { log.append(1) }
                r.add { log.append(2) }
                throw ManagerError.lastQueue(device: "d", id: 0)
            }
        }
        #expect(log == [2, 1])
    }

    @Test("a queue's owner closes its fd once; a second close does nothing")
    func queueHandle() throws {
        let driver = FakeDriver()
        let fd = try driver.openQueue(name: "x", flags: [.tap, .multiQueue])
        let h = QueueHandle(QueueFile(fd, driver: driver))
        #expect(!h.isClosed && driver.openFDs == 1)
        h.close()
        h.close()
        #expect(h.isClosed && driver.openFDs == 0)
    }
}

@Suite("limits that follow (fake driver, no root)")
struct LimitSourceTests {
    @Test("a device made without max_queues follows the global limit; one with its own keeps it, capped while lower")
    func follows() throws {
        let dir = StateDir()
        let m = try DeviceManager(driver: FakeDriver(), workers: 1, maxQueues: 64, stateFile: dir.file)
        defer { m.shutdown() }
        _ = try m.create(DeviceSpec(name: "g"))
        _ = try m.create(DeviceSpec(name: "o", maxQueues: 10))
        func limits() throws -> [Int] { [try m.device("g").maxQueues, try m.device("o").maxQueues] }
        #expect(try limits() == [64, 10])
        #expect(try m.device("g").maxQueuesSource == .global && m.device("o").maxQueuesSource == .device)
        _ = try m.setLimit(maxQueues: 8)
        #expect(try limits() == [8, 8])
        _ = try m.setLimit(maxQueues: 32)
        #expect(try limits() == [32, 10], "nothing was rewritten: each comes back to what it follows")
        #expect(dir.saved?.devices.map(\.spec.maxQueues) == [nil, 10])
        _ = try m.update("g", DevicePatch(maxQueues: 20))
        #expect(try m.device("g").maxQueuesSource == .device)
        // The state file keeps the difference, and an older file (no source) reads as the device's own.
        let text = String(decoding: try Files.read(dir.file.path)!, as: UTF8.self)
        #expect(text.contains("\"max_queues_source\":\"device\""))
        let old = try StateFile.decode(JSON.parse(Array(#"{"version":1,"max_queues":9,"devices":[{"name":"x","type":"tap","max_queues":5,"persist":false,"vnet_hdr":false,"up":true,"mode":"sink","queues":[{"id":0,"enabled":true}]}]}"#.utf8)))
        #expect(old.devices[0].spec.maxQueues == 5)
    }
}
