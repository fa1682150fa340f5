import Dispatch
import Logging
import Synchronization
import TunKit

/// What workers report, handled on the manager's event queue (never on a worker thread).
extension DeviceManager {
    /// A worker saw one of the device's queues fail as if the device were gone (or a read
    /// found it gone): it is dropped under the lock, its fds closed.
    func scheduleLost(key: UInt64) {
        events.async { [weak self] in self?.deviceLost(key: key) }
    }

    func deviceLost(key: UInt64) {
        change { model in
            guard let entry = model.devices.values.first(where: { $0.key == key }), vanished(entry) else { return }
            drop(entry, from: &model)
        }
    }

    /// Forgets a device that was deleted behind our back, closing what we held of it.
    func drop(_ entry: DeviceEntry, from model: inout ManagerModel) {
        if case .active(let d) = entry {
            release(d)
            // The device is gone: so are its leases.
            for l in d.leases.values { l.connection?.close() }
        }
        model.devices[entry.name] = nil
        journal.publish(.deviceVanished, device: entry.name)
        logger.warning("device gone", metadata: ["device": "\(entry.name)", "reason": "deleted outside mqtapd"])
    }

    /// A worker's rate-limited report of failed reads or writes on a queue.
    func reportErrors(device key: UInt64, queue qkey: UInt64, _ report: ErrorReport) {
        // Called on a worker thread: the log write (which may block) happens elsewhere.
        events.async { [weak self] in self?.logErrors(device: key, queue: qkey, report) }
    }

    private func logErrors(device key: UInt64, queue qkey: UInt64, _ report: ErrorReport) {
        let devices = published.withLock { $0.devices }
        guard case .active(let d)? = devices.values.first(where: { $0.key == key }) else { return }
        let id = d.queues.values.first { $0.key == qkey }?.id
        journal.publish(.queueErrors, device: d.name, queue: id, changes: [
            ("errno", .string(report.errno.name)), ("direction", .string(report.write ? "write" : "read")),
            ("suppressed", .int(Int(truncatingIfNeeded: report.suppressed))),
        ], now: true)
        logger.warning("queue i/o errors", metadata: [
            "device": "\(d.name)", "queue": "\(id.map(String.init) ?? "?")", "errno": "\(report.errno.name)",
            "direction": "\(report.write ? "write" : "read")", "suppressed": "\(report.suppressed)",
        ])
    }
}

/// Forwards worker reports to the manager without blocking the worker; set once the manager
/// exists (the pool starts before it does).
final class WorkerRelay: Sendable {
    private let target = Mutex<DeviceManager.WeakRef?>(nil)

    func set(_ manager: DeviceManager) { target.withLock { $0 = .init(manager) } }

    func gone(_ key: UInt64) {
        target.withLock { $0 }?.manager?.scheduleLost(key: key)
    }

    func errors(_ device: UInt64, _ queue: UInt64, _ report: ErrorReport) {
        target.withLock { $0 }?.manager?.reportErrors(device: device, queue: queue, report)
    }
}

extension DeviceManager {
    struct WeakRef: Sendable {
        weak var manager: DeviceManager?
        init(_ m: DeviceManager) { manager = m }
    }
}

// MARK: - Attach states changed outside the API

extension DeviceManager {
    /// Compares each queue's attach state, read from the daemon's fd, with the last one the
    /// daemon knew: a difference was made by someone else (a lease holder's TUNSETQUEUE, or
    /// another process sharing the open file), and becomes a `queue.enabled`/`disabled`
    /// event. Under the lock, so it never mistakes the API's own change for another's.
    ///
    /// It also follows each device's name (TUNGETIFF on its own fd: a rename behind the
    /// daemon's back is logged and saved, so a restart finds the device under its new name)
    /// and, once a second, the queues others attached by name and the namespace it is in.
    func observe() {
        let lookAtLinks = observeTicks.add(1, ordering: .relaxed).newValue % 5 == 0
        control.withLock { model in
            journal.hold()
            defer { journal.release(deliver: true) }
            var changed = false
            var renamed = false
            var lost: [UInt64] = []
            for case .active(var d) in model.devices.values {
                var touched = false
                if let fd = d.anyFD, let now = try? driver.boundName(fd), now != d.kernelName {
                    logger.warning("device renamed in the kernel; the API keeps its name",
                                   metadata: ["device": "\(d.name)", "from": "\(d.kernelName)", "to": "\(now)"])
                    d.kernelName = now
                    touched = true
                    renamed = true
                }
                // A device the daemon holds no queue of is gone when its index is.
                if lookAtLinks, d.anyFile == nil, d.anchor != nil, vanished(.active(d)) { lost.append(d.key) }
                if lookAtLinks, let (link, place) = lookUp(d) {
                    let foreign = foreignQueues(d, link)
                    if foreign != d.foreignQueues {
                        logger.warning("queues attached by another process", metadata: [
                            "device": "\(d.name)", "foreign_queues": "\(foreign)", "was": "\(d.foreignQueues)"])
                        d.foreignQueues = foreign
                        touched = true
                    }
                    if place != d.place {
                        if d.place != nil {
                            logger.info("device moved to another network namespace", metadata: [
                                "device": "\(d.name)", "netns_inode": "\(place.inode)", "netns": "\(place.name ?? "")"])
                        }
                        d.place = place
                        d.ifindex = link.ifindex
                        touched = true
                        // Where a restart finds it (or makes it) from now on: its namespace,
                        // never the host's once it left it.
                        let home = place.isOwn ? nil
                            : NetnsHome(path: place.name.map { "/run/netns/" + $0 } ?? (d.home?.inode == place.inode ? d.home?.path : nil),
                                        inode: place.inode)
                        if home != d.home {
                            d.home = home
                            renamed = true
                        }
                    }
                    // A holder's settings: put back once the daemon holds the device alone,
                    // and the workers kept off it while they cannot read it.
                    if checkSettings(&d, foreign: foreign, link: link, why: "observed") { touched = true }
                }
                // A hand-over that failed half-way (a lease's end, say) is tried again.
                let hold = holdsQueues(d)
                if d.queues.values.contains(where: { $0.lease == nil && $0.held != hold }) {
                    applyConsumerLogged(&d)
                    touched = true
                }
                // A revoked lease's file re-attached by its former holder: detached again.
                for i in d.revoked.indices {
                    let r = d.revoked[i]
                    guard r.file.withOpenFD({ (try? driver.isAttached($0)) ?? false }) == true else { continue }
                    if (try? driver.setQueue(r.file.fd, enabled: false)) != nil {
                        d.revoked[i].refusals += 1
                        touched = true
                        journal.publish(.queueDisabled, device: d.name, queue: r.id, lease: r.lease, by: .daemon,
                                        changes: [("revoked", .bool(true)), ("refusals", .int(d.revoked[i].refusals))])
                        logger.warning("a revoked lease's file was attached again by its former holder; detached",
                                       metadata: ["device": "\(d.name)", "queue": "\(r.id)", "lease": "\(r.lease)",
                                                  "refusals": "\(d.revoked[i].refusals)"])
                    }
                }
                for q in d.queues.values {
                    let attached: Bool
                    do throws(SyscallError) {
                        attached = try driver.isAttached(q.fd)
                    } catch {
                        // Deleted behind our back: noticed here even when no worker reads the
                        // device (all its queues detached or leased).
                        if error.errno == .badFileDescriptorState { lost.append(d.key) }
                        break
                    }
                    if q.lease == nil, q.held, attached {
                        // Held for the device's consumer, attached by someone sharing the file
                        // (a former holder): detached again.
                        if (try? driver.setQueue(q.fd, enabled: false)) != nil {
                            touched = true
                            journal.publish(.queueDisabled, device: d.name, queue: q.id, by: .daemon)
                            logger.warning("a held queue was attached by another holder of its file; detached",
                                           metadata: ["device": "\(d.name)", "queue": "\(q.id)"])
                            d.queues[q.id]!.seen = false
                            continue
                        }
                    }
                    guard attached != q.seen else { continue }
                    d.queues[q.id]!.seen = attached
                    touched = true
                    journal.publish(attached ? .queueEnabled : .queueDisabled, device: d.name, queue: q.id,
                                    lease: q.lease, by: q.lease == nil ? .kernel : .holder)
                }
                if touched {
                    model.devices[d.name] = .active(d)
                    changed = true
                }
            }
            if renamed { _ = save(&model) }
            if changed {
                let copy = model
                published.withLock { $0 = copy }
            }
            for key in lost { scheduleLost(key: key) }
        }
    }
}
