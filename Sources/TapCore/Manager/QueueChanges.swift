import Logging
import TunKit

// MARK: - Changes to a device's queues, and the global limit

extension DeviceManager {
    /// `count` queues (add the smallest free ids, or remove the highest that are not leased)
    /// with the `enabled` lowest ids attached and the rest detached. Decided before anything
    /// is touched.
    func declaredQueues(_ d: ActiveDevice, count: Int, enabled: Int?, limit: Int,
                        foreign: Int = 0) throws(ManagerError) -> QueuePlan {
        var plan = QueuePlan()
        let current = d.queueCount
        if count > current {
            guard count + foreign <= limit else {
                throw .queueLimitExceeded(device: d.name, limit: limit, requested: count + foreign, errno: nil)
            }
            plan.add = Self.freeIDs(count - current, taken: { d.hasQueue($0) })
        } else if count < current {
            let removable = d.queues.values.filter { $0.lease == nil }.map(\.id).sorted(by: >)
            guard removable.count >= current - count else {
                let leased = d.queues.values.compactMap { q in q.lease.map { (q.id, $0) } }.sorted { $0.0 > $1.0 }.first
                    ?? d.orphans.values.map { ($0.id, $0.lease) }.sorted { $0.0 > $1.0 }.first!
                throw .queueLeased(device: d.name, id: leased.0, lease: leased.1)
            }
            plan.remove = Array(removable.prefix(current - count))
        }
        guard let k = enabled else { return plan }
        guard k <= count else { throw .notEnoughQueues(device: d.name, queues: count, enabled: k) }
        let ids = (Set(d.queues.keys).union(d.orphans.keys).union(plan.add)).subtracting(plan.remove).sorted()
        for (i, id) in ids.enumerated() {
            let on = i < k
            if let o = d.orphans[id] {
                // The daemon holds no fd of an orphaned queue: it cannot change it.
                if o.enabled != on { throw .queueLeased(device: d.name, id: id, lease: o.lease) }
                continue
            }
            let isOn = d.queues[id].map { q in q.lease == nil ? q.enabled : ((try? driver.isAttached(q.fd)) ?? q.enabled) } ?? true
            if isOn != on { plan.attach.append((id, on)) }
        }
        return plan
    }

    /// Adds `count` queues with the smallest free ids.
    public func addQueues(_ name: String, count: Int = 1) throws(ManagerError) -> [QueueInfo] {
        try Validate.queueCount(count, field: "count")
        return try change { (model) throws(ManagerError) in
            var d = try active(name, in: &model)
            guard d.multiQueue else { throw .notMultiQueue(device: name) }
            let limit = queueLimit(own: d.ownMaxQueues, global: model.maxQueues)
            let foreign = try queuesBesidesOwn(d)
            // Every term is at most 256: no overflow.
            guard d.queueCount + foreign + count <= limit else {
                throw .queueLimitExceeded(device: name, limit: limit, requested: d.queueCount + foreign + count, errno: nil, field: "count")
            }
            let ids = Self.freeIDs(count, taken: { d.hasQueue($0) })
            let added = try withRollback { (rollback) throws(ManagerError) in
                try openQueues(ids: ids, for: d, model: &model, rollback: &rollback)
            }
            for q in added { d.queues[q.id] = q }
            model.devices[name] = .active(d)
            for id in ids { journal.publish(.queueAdded, device: name, queue: id, by: .api) }
            logger.info("queues added", metadata: ["device": "\(name)", "queue": "\(ids.map(String.init).joined(separator: ","))", "count": "\(d.queues.count)"])
            return added.map(\.info)
        }
    }

    /// Removes a queue; returns it as it was last, its final counters included.
    @discardableResult
    public func removeQueue(_ name: String, id: Int) throws(ManagerError) -> QueueInfo {
        try change { (model) throws(ManagerError) in
            var d = try active(name, in: &model)
            if let o = d.orphans[id] { throw .queueLeased(device: name, id: id, lease: o.lease) }
            guard let q = d.queues[id] else { throw .queueNotFound(device: name, id: id) }
            if let l = q.lease { throw .queueLeased(device: name, id: id, lease: l) }
            guard d.queueCount > 1 else { throw .lastQueue(device: name, id: id) }
            remove(id, from: &d)
            model.devices[name] = .active(d)
            journal.publish(.queueRemoved, device: name, queue: id, by: .api)
            logger.info("queue removed", metadata: ["device": "\(name)", "queue": "\(id)", "count": "\(d.queues.count)"])
            // Read after the worker let go of it: these are the final counts.
            return q.info
        }
    }

    /// Detaches (`false`) or re-attaches (`true`) a queue; its fd, id, worker and counters stay.
    public func setQueueEnabled(_ name: String, id: Int, _ enabled: Bool) throws(ManagerError) -> QueueInfo {
        try change { (model) throws(ManagerError) in
            var d = try active(name, in: &model)
            if let o = d.orphans[id] { throw .queueLeased(device: name, id: id, lease: o.lease) }
            if !d.multiQueue && !enabled {
                throw .invalidField(field: "enabled", reason: "a one-queue device's queue cannot be detached (no TUNSETQUEUE)")
            }
            if let q = d.queues[id], q.lease == nil, q.held, enabled {
                throw .queuesHeld(device: name, consumer: d.consumer, leases: d.leases.keys.sorted())
            }
            let was = d.queues[id]?.knownAttached
            let q = try withRollback { (rollback) throws(ManagerError) in
                try setEnabled(&d, id: id, enabled, rollback: &rollback)
            }
            model.devices[name] = .active(d)
            if was != enabled {
                journal.publish(enabled ? .queueEnabled : .queueDisabled, device: name, queue: id, by: .api)
            }
            // Just set, and read back by `setEnabled` (a held queue stays detached, as it is).
            return q.info(attached: q.knownAttached)
        }
    }

    /// Sets the global per-device queue limit; every device's `max_queues` is capped to it.
    public func setLimit(maxQueues: Int) throws(ManagerError) -> LimitsInfo {
        try Validate.maxQueues(maxQueues)
        try change { (model) throws(ManagerError) in
            for entry in model.devices.values.sorted(by: { $0.name < $1.name }) {
                var foreign = 0
                if let d = entry.active {
                    do throws(ManagerError) {
                        foreign = try queuesBesidesOwn(d)
                    } catch .deviceNotFound {
                        // Gone behind the daemon's back (dropped on the event path): it uses
                        // nothing, and a device that is going must not hold the limit up.
                        continue
                    }
                }
                guard entry.queueCount + foreign <= maxQueues else {
                    throw .limitBelowUsage(field: "max_queues", limit: maxQueues, device: entry.name, inUse: entry.queueCount + foreign)
                }
            }
            let old = model.maxQueues
            model.maxQueues = maxQueues
            if old != maxQueues { journal.publish(.limitsChanged, changes: [("max_queues", .int(maxQueues))]) }
            logger.info("limit set", metadata: ["max_queues": "\(maxQueues)"])
        }
        return limits()
    }

    /// The `count` smallest ids not `taken`.
    static func freeIDs(_ count: Int, taken: (Int) -> Bool) -> [Int] {
        var ids: [Int] = []
        var candidate = 0
        while ids.count < count {
            if !taken(candidate) { ids.append(candidate) }
            candidate += 1
        }
        return ids
    }
}
