import Synchronization
import TunKit

/// What happened, for watchers (`GET /v1/events`).
public struct Event: Sendable, Hashable {
    public enum Kind: String, Sendable, Hashable, CaseIterable {
        case deviceCreated = "device.created"
        case deviceDeleted = "device.deleted"
        case deviceChanged = "device.changed"
        case deviceVanished = "device.vanished"
        case deviceConflict = "device.conflict"
        case deviceFailed = "device.failed"
        case queueAdded = "queue.added"
        case queueRemoved = "queue.removed"
        case queueEnabled = "queue.enabled"
        case queueDisabled = "queue.disabled"
        case queueErrors = "queue.errors"
        case leaseGranted = "lease.granted"
        case leaseReleased = "lease.released"
        case leaseRevoked = "lease.revoked"
        case limitsChanged = "limits.changed"
    }

    /// Who made a queue change: the API, a lease holder (seen on a leased queue), the
    /// kernel (seen on any other queue: another process), or the daemon itself (restoring
    /// attach states when a lease ends, detaching on a revoke).
    public enum Source: String, Sendable, Hashable {
        case api, holder, kernel, daemon
    }

    /// A changed field's new value.
    public enum Value: Sendable, Hashable {
        case int(Int)
        case string(String)
        case bool(Bool)
    }

    /// Ids go up by one from 1 at each start of the daemon.
    public let id: UInt64
    public let time: String
    public let kind: Kind
    public let device: String?
    public let queue: Int?
    public let lease: String?
    public let by: Source?
    /// For `device.changed` and `limits.changed`: the fields that changed, with their new
    /// values, in order; for `queue.errors`: the errno and direction.
    public let changes: [(String, Value)]

    public static func == (a: Event, b: Event) -> Bool { a.id == b.id }
    public func hash(into h: inout Hasher) { h.combine(id) }
}

/// Receives events as they happen. Called with the journal's lock held: it must not block
/// (copy, wake, return). False: the watcher is gone or cut; it is dropped.
public protocol EventSink: AnyObject, Sendable {
    func deliver(_ event: Event) -> Bool
}

/// The daemon's events: a bounded ring of the most recent (`retention`), and the watchers
/// they go to as they happen. Ids go up by one from 1; `boot` names this run.
public final class EventJournal: Sendable {
    public let boot: String
    public let retention: Int

    private struct State {
        var ring: [Event] = []
        /// Index in `ring` of the oldest event once the ring is full.
        var head = 0
        var nextID: UInt64 = 1
        var sinks: [ObjectIdentifier: any EventSink] = [:]
        /// A change in progress holds its events until the state it describes is readable.
        var holding = false
        var held: [Pending] = []
    }

    private struct Pending {
        let time: String
        let kind: Event.Kind
        let device: String?
        let queue: Int?
        let lease: String?
        let by: Event.Source?
        let changes: [(String, Event.Value)]
    }

    private let state = Mutex(State())

    public init(retention: Int = 4096) {
        precondition(retention >= 1, "at least one event is kept")
        self.retention = retention
        var g = SystemRandomNumberGenerator()
        let hex = String(g.next(), radix: 16)
        boot = String(repeating: "0", count: 16 - hex.count) + hex
    }

    /// Records an event and hands it to every watcher; while a change holds events (`hold`),
    /// it waits for the change's end, unless `now`.
    public func publish(_ kind: Event.Kind, device: String? = nil, queue: Int? = nil, lease: String? = nil,
                        by: Event.Source? = nil, changes: [(String, Event.Value)] = [], now: Bool = false) {
        let p = Pending(time: Clock.timestamp(), kind: kind, device: device, queue: queue, lease: lease, by: by,
                        changes: changes)
        state.withLock { s in
            if s.holding && !now {
                s.held.append(p)
            } else {
                Self.record(p, in: &s, retention: retention)
            }
        }
    }

    /// Holds the events published from now on (the manager's change in progress: they go out
    /// once the state they describe can be read).
    func hold() { state.withLock { $0.holding = true } }

    /// Ends a hold: the held events go out in order, or are dropped (`deliver` false: the
    /// change failed and was undone).
    func release(deliver: Bool) {
        state.withLock { s in
            s.holding = false
            let held = s.held
            s.held = []
            if deliver { for p in held { Self.record(p, in: &s, retention: retention) } }
        }
    }

    private static func record(_ p: Pending, in s: inout State, retention: Int) {
        let e = Event(id: s.nextID, time: p.time, kind: p.kind, device: p.device, queue: p.queue, lease: p.lease,
                      by: p.by, changes: p.changes)
        s.nextID += 1
        if s.ring.count < retention {
            s.ring.append(e)
        } else {
            s.ring[s.head] = e
            s.head = (s.head + 1) % retention
        }
        for (key, sink) in s.sinks where !sink.deliver(e) { s.sinks[key] = nil }
    }

    public enum ReplayError: Error, Equatable {
        /// Events after `since` are gone: the oldest kept is `oldest`.
        case expired(since: UInt64, oldest: UInt64)
    }

    /// The retained events after `since` (all of them for nil), oldest first; and, if `sink`
    /// is given, it is subscribed in the same step, so nothing is missed or seen twice.
    public func replay(after since: UInt64?, subscribing sink: (any EventSink)? = nil) throws(ReplayError) -> [Event] {
        try state.withLock { (s) throws(ReplayError) -> [Event] in
            let ordered = Array(s.ring[s.head...] + s.ring[..<s.head])
            let oldest = ordered.first?.id ?? s.nextID
            if let since, since + 1 < oldest { throw .expired(since: since, oldest: oldest) }
            if let sink { s.sinks[ObjectIdentifier(sink)] = sink }
            guard let since else { return ordered }
            return ordered.filter { $0.id > since }
        }
    }

    /// Stops delivering to `sink`.
    public func unsubscribe(_ sink: any EventSink) {
        state.withLock { _ = $0.sinks.removeValue(forKey: ObjectIdentifier(sink)) }
    }

    /// The id the next event will have.
    public var nextID: UInt64 { state.withLock { $0.nextID } }

    public var watchers: Int { state.withLock { $0.sinks.count } }
}
