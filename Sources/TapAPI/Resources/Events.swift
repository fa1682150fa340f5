import Dispatch
import Synchronization
import TapCore
import TapJSON
import TunKit

/// `GET /v1/events`: newline-delimited JSON, one event per line, as it happens.
enum EventsResource {
    static let contentType = "application/x-ndjson"

    struct Query: Equatable {
        var since: UInt64?
        var follow = true
        var device: String?
    }

    static func decodeQuery(_ r: HTTPRequest) throws(APIError) -> Query {
        var q = Query()
        if let s = r.query["since"] {
            guard s.utf8.count <= 19, s.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let n = UInt64(s) else {
                throw APIError.invalidField("since", "must be an event id (a non-negative integer)")
            }
            q.since = n
        }
        q.follow = try DevicesResource.flag(r, "follow", default: true)
        if let d = r.query["device"] {
            guard !d.isEmpty else { throw APIError.invalidField("device", "must not be empty") }
            q.device = d
        }
        return q
    }

    /// One event as its line (with the trailing newline).
    static func line(_ e: Event, boot: String) -> [UInt8] {
        var o: JSONObject = ["id": JSON(Int(truncatingIfNeeded: e.id)), "boot": .string(boot), "time": .string(e.time),
                             "type": .string(e.kind.rawValue)]
        if let d = e.device { o["device"] = .string(d) }
        if let q = e.queue { o["queue"] = JSON(q) }
        if let l = e.lease { o["lease"] = .string(l) }
        if let by = e.by { o["by"] = .string(by.rawValue) }
        if !e.changes.isEmpty {
            o["changes"] = .object(JSONObject(e.changes.map { (key, value) in
                switch value {
                case .int(let i): return (key: key, value: JSON(i))
                case .string(let s): return (key: key, value: .string(s))
                case .bool(let b): return (key: key, value: .bool(b))
                }
            }))
        }
        return JSON.object(o).serialized() + [10]
    }

    static func get(_ m: DeviceManager, _ hub: EventHub, _ r: HTTPRequest) throws -> HTTPResponse {
        let q = try decodeQuery(r)
        let journal = m.journal
        // Watchers and leases hold connections for long: keep room for everything else.
        if q.follow && hub.count >= EventHub.maxStreams {
            throw APIError.tooMany("event watchers", limit: EventHub.maxStreams)
        }
        let headers = [("Content-Type", contentType), ("Cache-Control", "no-store")]
        let stream = q.follow ? EventStream(device: q.device, boot: journal.boot) : nil
        let replay: [Event]
        do {
            // Without `since`, a follow starts from now; `follow=false` without it returns all.
            replay = try journal.replay(after: q.since ?? (q.follow ? journal.nextID - 1 : nil), subscribing: stream)
        } catch {
            guard case .expired(let since, let oldest) = error else { throw error }
            throw APIError.eventsExpired(since: since, oldest: oldest)
        }
        let lines = replay.filter { q.device == nil || $0.device == q.device }.flatMap { line($0, boot: journal.boot) }
        guard let stream else { return HTTPResponse(status: 200, headers: headers, body: lines) }
        stream.prime(lines)
        hub.add(stream, journal: journal)
        var response = HTTPResponse(status: 200, headers: headers)
        response.stream = stream
        return response
    }
}

/// One watcher: events encoded into a bounded buffer as they happen, read out by the server
/// as the client takes them. A watcher that falls behind by more than `capacity` bytes is cut.
final class EventStream: EventSink, StreamBody, @unchecked Sendable {
    // SAFETY (@unchecked): every field but the immutable ones is in `state`, under its lock.
    let device: String?
    let boot: String
    /// Bytes a watcher may fall behind before it is cut.
    static let capacity = 256 * 1024

    private struct State {
        var buffer: [UInt8] = []
        var offset = 0
        var cut = false
        var finished = false
        var closed = false
        var wake: (@Sendable () -> Void)?
        /// Replayed bytes still unread, allowed on top of `capacity`.
        var allowance = 0
        /// When something was last queued (for the keep-alive line).
        var lastWrite = Clock.monotonicNanoseconds()
    }

    private let state = Mutex(State())

    init(device: String?, boot: String) {
        self.device = device
        self.boot = boot
    }

    /// The replayed lines, before the live events that may have come since the subscription.
    /// They do not count toward the cut: a watcher is cut for falling behind, not for asking
    /// for what is kept.
    func prime(_ lines: [UInt8]) {
        state.withLock { s in
            s.buffer = lines + s.buffer[s.offset...]
            s.offset = 0
            s.allowance = lines.count
        }
    }

    func deliver(_ event: Event) -> Bool {
        if let device, event.device != device { return !isClosed }
        return append(Self.encoded(event, boot: boot))
    }

    /// The last event's line: the journal hands one event to every watcher in turn (under its
    /// lock), so it is encoded once, not once per watcher.
    private static let last = Mutex<(id: UInt64, boot: String, line: [UInt8])?>(nil)

    static func encoded(_ e: Event, boot: String) -> [UInt8] {
        if let hit = last.withLock({ c in c.flatMap { $0.id == e.id && $0.boot == boot ? $0.line : nil } }) { return hit }
        let line = EventsResource.line(e, boot: boot)
        last.withLock { $0 = (e.id, boot, line) }
        return line
    }

    /// Queues bytes and wakes the server; false once the watcher is cut or gone.
    @discardableResult
    func append(_ bytes: [UInt8]) -> Bool {
        let (keep, wake) = state.withLock { s -> (Bool, (@Sendable () -> Void)?) in
            guard !s.cut, !s.closed, !s.finished else { return (false, nil) }
            if s.buffer.count - s.offset + bytes.count > Self.capacity + s.allowance {
                // Fallen too far behind: cut, and the memory goes now.
                s.cut = true
                s.buffer = []
                s.offset = 0
                return (false, s.wake)
            }
            if s.offset > 0 && s.offset == s.buffer.count {
                s.buffer.removeAll(keepingCapacity: true)
                s.offset = 0
            }
            s.buffer += bytes
            s.lastWrite = Clock.monotonicNanoseconds()
            return (true, s.wake)
        }
        wake?()
        return keep
    }

    /// A blank line if nothing was written for `idle` seconds, so the connection stays open
    /// through idle timeouts of proxies and clients.
    func keepAlive(idle seconds: Double) {
        let due = state.withLock { Clock.monotonicNanoseconds() - $0.lastWrite >= UInt64(seconds * 1e9) }
        if due { append([10]) }
    }

    var isClosed: Bool { state.withLock { $0.closed || $0.cut } }

    func read(into out: UnsafeMutableRawBufferPointer) -> StreamRead {
        state.withLock { s in
            if s.cut { return .abort }
            let n = min(out.count, s.buffer.count - s.offset)
            if n > 0 {
                s.buffer.withUnsafeBytes { src in
                    out.baseAddress!.copyMemory(from: src.baseAddress! + s.offset, byteCount: n)
                }
                s.offset += n
                s.allowance = max(0, s.allowance - n)
                if s.offset == s.buffer.count {
                    s.buffer.removeAll(keepingCapacity: s.buffer.count <= 64 * 1024)
                    s.offset = 0
                }
                return .bytes(n)
            }
            return s.finished ? .end : .waiting
        }
    }

    func onReady(_ wake: @escaping @Sendable () -> Void) { state.withLock { $0.wake = wake } }

    func finish() {
        let wake = state.withLock { s in
            s.finished = true
            return s.wake
        }
        wake?()
    }

    func close() {
        state.withLock { s in
            s.closed = true
            s.buffer = []
            s.wake = nil
        }
    }
}

/// The open event streams: a thread that writes the keep-alive line into idle ones and
/// forgets the ones that ended.
public final class EventHub: Sendable {
    private struct Watched {
        let stream: EventStream
        let journal: EventJournal
    }

    private let streams = Mutex<[ObjectIdentifier: Watched]>([:])
    private let ticker = Mutex<PeriodicThread?>(nil)
    /// Seconds of silence before a blank line.
    let idle: Double
    /// Open streams at most (of the server's 256 connections).
    public static let maxStreams = 128

    public init(keepAliveSeconds: Double = 15) throws(SyscallError) {
        idle = keepAliveSeconds
        let t = try PeriodicThread(name: "mqtapd-events", every: min(1, keepAliveSeconds / 2)) { [weak self] in self?.tick() }
        ticker.withLock { $0 = t }
    }

    func add(_ s: EventStream, journal: EventJournal) {
        streams.withLock { $0[ObjectIdentifier(s)] = Watched(stream: s, journal: journal) }
    }

    /// Open streams.
    public var count: Int { streams.withLock { $0.count } }

    /// Forgets the streams that ended; gives the idle ones their keep-alive line.
    private func tick() {
        let all = streams.withLock { Array($0) }
        for (key, w) in all {
            if w.stream.isClosed {
                w.journal.unsubscribe(w.stream)
                streams.withLock { _ = $0.removeValue(forKey: key) }
            } else {
                w.stream.keepAlive(idle: idle)
            }
        }
    }

    /// Stops the thread (the servers end the streams themselves). Idempotent.
    public func stop() { ticker.withLock { $0 }?.stop() }
}
