#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization
import TapCore
import TapTestSupport
import Testing
import TunKit

/// Keeps every log record, for tests.
final class CapturedLog: Sendable {
    struct Record: Sendable {
        let level: Logger.Level
        let message: String
        let metadata: [String: String]
    }

    let records = Mutex<[Record]>([])

    var logger: Logger {
        Logger(label: "test") { _ in Handler(sink: self) }
    }

    func matching(_ message: String) -> [Record] { records.withLock { $0.filter { $0.message == message } } }

    struct Handler: LogHandler {
        let sink: CapturedLog
        var logLevel: Logger.Level = .trace
        var metadata: Logger.Metadata = [:]
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
                 file: String, function: String, line: UInt) {
            let m = (metadata ?? [:]).mapValues { $0.description }
            sink.records.withLock { $0.append(Record(level: level, message: message.description, metadata: m)) }
        }
    }
}

@Suite("logs")
struct LogTests {
    @Test("changes are logged with device and queue fields")
    func fields() throws {
        let log = CapturedLog()
        let m = try DeviceManager(driver: FakeDriver(), workers: 1, logger: log.logger)
        defer { m.shutdown() }
        _ = try m.create(DeviceSpec(name: "d", queues: 2))
        try m.removeQueue("d", id: 1)
        #expect(log.matching("device created").first?.metadata["device"] == "d")
        #expect(log.matching("queue removed").first?.metadata["queue"] == "1")
    }

    @Test("per-packet errors are counted per frame but logged at most once a second per queue")
    func rateLimited() throws {
        let log = CapturedLog()
        let driver = FakeDriver()
        let m = try DeviceManager(driver: driver, workers: 1, logger: log.logger)
        defer { m.shutdown() }
        _ = try m.create(DeviceSpec(name: "e", mode: .echo))
        let peer = try #require(driver.peer(of: driver.fds(of: "e")[0]))
        // The peer stops reading: every echo write fails with EPIPE.
        shutdown(peer, Int32(SHUT_RD))
        let frame = [UInt8](repeating: 0xab, count: 60)
        for _ in 0..<200 { inject(peer, frame) }
        #expect(eventually { (try? m.stats("e").total.txErrors) == 200 })
        #expect(try m.stats("e").total.rxPackets == 200)
        #expect(eventually { !log.matching("queue i/o errors").isEmpty })
        let reports = log.matching("queue i/o errors")
        #expect(reports.count <= 2, "\(reports.count) reports for 200 failures within a second")
        #expect(reports.first?.metadata["errno"] == "EPIPE")
        #expect(reports.first?.metadata["device"] == "e" && reports.first?.metadata["queue"] == "0")
    }
}

@Suite("log timestamps")
struct TimestampTests {
    @Test("RFC 3339 UTC with milliseconds, and the current time")
    func format() throws {
        // clock_gettime, as Clock.timestamp reads it: time(2) reads the coarse clock, which can
        // still show the last second just after the precise clock turned over.
        func now() -> Int {
            var t = timespec()
            clock_gettime(CLOCK_REALTIME, &t)
            return t.tv_sec
        }
        let before = now()
        let ts = Clock.timestamp()
        let after = now()
        let match = try #require(ts.wholeMatch(of: /(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})Z/))
        var t = tm()
        t.tm_year = Int32(match.1)! - 1900
        t.tm_mon = Int32(match.2)! - 1
        t.tm_mday = Int32(match.3)!
        t.tm_hour = Int32(match.4)!
        t.tm_min = Int32(match.5)!
        t.tm_sec = Int32(match.6)!
        let seconds = timegm(&t)
        #expect(seconds >= before && seconds <= after, "\(ts)")
    }
}
