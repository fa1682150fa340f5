import Dispatch
import Logging
import Synchronization
import TunKit

/// What workers report, handled on the manager's event queue (never on a worker thread).
extension DeviceManager {
    /// A worker saw one of the device's queues fail as if the device were gone (or a read
    /// found it gone): it is dropped under the lock, its fds closed.
    func scheduleLost(key: UInt64) {
        reports.async { [weak self] in self?.deviceLost(key: key) }
    }

    func deviceLost(key: UInt64) {
        changeUnrefused { model in
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
        reports.async { [weak self] in self?.logErrors(device: key, queue: qkey, report) }
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
