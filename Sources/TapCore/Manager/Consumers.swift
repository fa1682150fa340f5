import Logging
import TunKit

/// The device-wide settings any holder of one of its queues can change, as the kernel has
/// them (read through the daemon's own fd).
struct DeviceSettings: Hashable, Sendable {
    var vnet: VnetSettings
    /// TUNSETOWNER / TUNSETGROUP as rtnetlink reports them; nil: none set.
    var owner: UInt32?
    var group: UInt32?
}

/// One consumer per device: the kernel spreads a device's frames over every attached queue,
/// whoever holds it, and its vnet header size, offloads, byte order, owner and programs are
/// the device's, not a queue's. So the daemon's workers read a device only while nobody else
/// consumes it, and the daemon puts its settings back when a holder leaves.
extension DeviceManager {
    /// Whether the daemon's own (not leased) queues are held detached now: another consumer
    /// has the device, or its settings are not what the workers can read.
    func holdsQueues(_ d: ActiveDevice) -> Bool {
        d.consumer != .daemon || d.unreadable != nil
    }

    /// Makes every queue the daemon holds match who consumes the device: detached and not
    /// read while another consumer has it, attached and read (as the API set) once the daemon
    /// has it again. Each step's undo goes into `rollback`.
    func applyConsumer(_ d: inout ActiveDevice, rollback: inout Rollback) throws(ManagerError) {
        let hold = holdsQueues(d)
        for id in d.queues.keys.sorted() {
            var q = d.queues[id]!
            guard q.lease == nil, q.held != hold else { continue }
            let before = q
            let entry = d
            let attached = (try? driver.isAttached(q.fd)) ?? q.wantsAttached
            if hold {
                // Out of the epoll set before the kernel detaches it (a detached queue polls
                // as POLLERR forever).
                if q.polled {
                    pool.stopPolling(key: q.key, on: q.worker)
                    rollback.add { [pool] in try? pool.startPolling(self.polledQueue(before, of: entry), on: before.worker) }
                }
                if attached {
                    try step(d.name, .detachQueue) { () throws(SyscallError) in try driver.setQueue(q.fd, enabled: false) }
                    rollback.add { [driver] in try? driver.setQueue(before.fd, enabled: true) }
                    journal.publish(.queueDisabled, device: d.name, queue: id, by: .daemon)
                }
                q.held = true
                q.knownAttached = false
            } else {
                q.held = false
                if q.enabled {
                    if !attached {
                        try step(d.name, .attachQueue) { () throws(SyscallError) in try driver.setQueue(q.fd, enabled: true) }
                        rollback.add { [driver] in try? driver.setQueue(before.fd, enabled: false) }
                        journal.publish(.queueEnabled, device: d.name, queue: id, by: .daemon)
                    }
                    var now = d
                    now.queues[id] = q
                    do throws(SyscallError) {
                        try pool.startPolling(polledQueue(q, of: now), on: q.worker)
                    } catch {
                        throw ManagerError.from(error, device: d.name, step: .pollQueue)
                    }
                    rollback.add { [pool] in pool.stopPolling(key: before.key, on: before.worker) }
                } else if attached {
                    // Someone sharing the file attached it meanwhile: the API said detached.
                    try step(d.name, .detachQueue) { () throws(SyscallError) in try driver.setQueue(q.fd, enabled: false) }
                    journal.publish(.queueDisabled, device: d.name, queue: id, by: .daemon)
                }
                q.knownAttached = q.enabled
            }
            d.queues[id] = q
        }
    }

    /// `applyConsumer` where a refusal is not possible (a lease's end, the observer): a step
    /// that fails is logged, and the rest stays as it was.
    func applyConsumerLogged(_ d: inout ActiveDevice) {
        var copy = d
        do throws(ManagerError) {
            try withRollback { (rollback) throws(ManagerError) in try applyConsumer(&copy, rollback: &rollback) }
            d = copy
        } catch {
            logger.error("queues not handed to the device's consumer", metadata: [
                "device": "\(d.name)", "consumer": "\(d.consumer.rawValue)", "error": "\(error)"])
        }
    }

    /// The settings as the kernel has them now, through the daemon's own fd; nil when there is
    /// no fd to ask or the device went.
    func readSettings(_ d: ActiveDevice, link: LinkInfo? = nil) throws(SyscallError) -> DeviceSettings? {
        guard let file = d.anyFile else { return nil }
        let driver = self.driver
        return try read(through: file) { fd throws(SyscallError) -> DeviceSettings? in
            let vnet = try driver.vnetSettings(fd)
            let now: LinkInfo? = if let link { link } else { try self.link(of: fd) }
            let tun = now?.tun
            return DeviceSettings(vnet: vnet, owner: tun?.owner, group: tun?.group)
        }
    }

    /// The same, for the steps that cannot refuse (a lease's end, the observer): a read the
    /// kernel refuses is logged, and nothing is decided on it.
    func settingsLogged(_ d: ActiveDevice, link: LinkInfo? = nil) -> DeviceSettings? {
        do throws(SyscallError) {
            return try readSettings(d, link: link)
        } catch {
            logger.error("device settings not read", metadata: ["device": "\(d.name)", "error": "\(error)"])
            return nil
        }
    }

    /// The settings the daemon set and puts back: the default vnet header (10 bytes),
    /// little-endian headers (neither byte-order flag), the API's owner and group.
    func wanted(_ d: ActiveDevice, from now: DeviceSettings) -> DeviceSettings {
        DeviceSettings(vnet: VnetSettings(headerSize: QueueAction.vnetHeaderSize,
                                          littleEndian: now.vnet.littleEndian.map { _ in false },
                                          bigEndian: now.vnet.bigEndian.map { _ in false }),
                       owner: d.owner ?? now.owner, group: d.group ?? now.group)
    }

    /// The names of the settings where the kernel differs from what the API set.
    func differences(_ d: ActiveDevice, _ now: DeviceSettings) -> [String] {
        let want = wanted(d, from: now)
        var out: [String] = []
        if now.vnet.headerSize != want.vnet.headerSize { out.append("vnet_hdr_size") }
        if now.vnet.littleEndian != want.vnet.littleEndian || now.vnet.bigEndian != want.vnet.bigEndian {
            out.append("vnet_byte_order")
        }
        if d.owner == nil ? now.owner != nil : now.owner != d.owner { out.append("owner") }
        if d.group == nil ? now.group != nil : now.group != d.group { out.append("group") }
        return out
    }

    /// Why the workers cannot read the device as it is now (nil: they can): with a vnet header,
    /// every frame starts with one of the size the kernel was told, and a worker that expects
    /// another would count, parse and forward every frame wrongly.
    func unreadableReason(_ d: ActiveDevice, _ now: DeviceSettings) -> String? {
        guard d.vnetHdr, now.vnet.headerSize != QueueAction.vnetHeaderSize else { return nil }
        return "its vnet header size is \(now.vnet.headerSize) (another holder set it); the daemon reads "
            + "\(QueueAction.vnetHeaderSize)-byte headers and does not read the device until it is put back"
    }

    /// Puts the device's settings back as the API set them, once nobody else holds it: the
    /// vnet header size and byte order, the offloads, no eBPF program or TX filter, owner and
    /// group. Returns what was put back (for the event and the log).
    @discardableResult
    func restoreSettings(_ d: inout ActiveDevice, why: String) -> [String] {
        guard let fd = d.anyFD, let now = settingsLogged(d) else { return [] }
        let want = wanted(d, from: now)
        var restored: [String] = []
        func attempt(_ what: String, _ body: () throws(SyscallError) -> Void) {
            do throws(SyscallError) {
                try body()
                restored.append(what)
            } catch {
                logger.error("device setting not put back", metadata: ["device": "\(d.name)", "setting": "\(what)", "error": "\(error)"])
            }
        }
        if now.vnet.headerSize != want.vnet.headerSize {
            attempt("vnet_hdr_size") { () throws(SyscallError) in try driver.setVnetHeaderSize(fd, want.vnet.headerSize) }
        }
        if now.vnet.littleEndian == true || now.vnet.bigEndian == true {
            attempt("vnet_byte_order") { () throws(SyscallError) in
                try driver.setVnetByteOrder(fd, littleEndian: now.vnet.littleEndian == true ? false : nil,
                                            bigEndian: now.vnet.bigEndian == true ? false : nil)
            }
        }
        // No getter exists for these: set whatever they are, and not named unless they failed.
        do throws(SyscallError) {
            if d.kind == .tap || d.offload { try driver.setOffload(fd, d.offloads) }
            try driver.clearPrograms(fd, tap: d.kind == .tap)
        } catch {
            logger.error("offloads or eBPF programs not put back", metadata: ["device": "\(d.name)", "error": "\(error)"])
        }
        if let uid = d.owner, now.owner != uid {
            attempt("owner") { () throws(SyscallError) in try driver.setOwner(fd, uid) }
        }
        if let gid = d.group, now.group != gid {
            attempt("group") { () throws(SyscallError) in try driver.setGroup(fd, gid) }
        }
        d.settings = settingsLogged(d) ?? d.settings
        if !restored.isEmpty {
            journal.publish(.deviceChanged, device: d.name, by: .daemon,
                            changes: [("restored", .string(restored.joined(separator: ",")))])
            logger.info("device settings put back", metadata: ["device": "\(d.name)", "restored": "\(restored.joined(separator: ","))",
                                                                "why": "\(why)"])
        }
        return restored
    }

    /// Reads the settings, puts them back if the daemon is the device's only holder, and holds
    /// or releases the daemon's queues by whether the workers can read the device now.
    /// `foreign`: queues others attached by name, as just seen (nil: not known, so the daemon
    /// is not known to hold the device alone and puts nothing back). Returns whether anything
    /// changed.
    @discardableResult
    func checkSettings(_ d: inout ActiveDevice, foreign: Int?, link: LinkInfo? = nil, why: String) -> Bool {
        guard var now = settingsLogged(d, link: link) else { return false }
        let before = (d.settings, d.unreadable)
        if d.leases.isEmpty && foreign == 0 && !differences(d, now).isEmpty {
            restoreSettings(&d, why: why)
            now = d.settings ?? now
        }
        d.settings = now
        let reason = unreadableReason(d, now)
        if reason != d.unreadable {
            if let reason {
                logger.warning("device not read: its settings changed", metadata: ["device": "\(d.name)", "reason": "\(reason)"])
            } else {
                logger.info("device read again: its settings are back", metadata: ["device": "\(d.name)"])
            }
            d.unreadable = reason
            applyConsumerLogged(&d)
        }
        return before.0 != d.settings || before.1 != d.unreadable
    }

    /// One consumer per device, for forwarding: a leased device is never forwarded to or from,
    /// and neither is one in mode external.
    func checkForwardConsumers(device name: String, mode: DeviceMode, peer: String?, in model: ManagerModel) throws(ManagerError) {
        if mode == .forward, let p = peer, case .active(let other)? = model.devices[p] {
            if !other.leases.isEmpty {
                throw .deviceForwarding(device: name, reason: "cannot forward to \(p): it is leased", field: "peer")
            }
            if other.mode == .external {
                throw .deviceForwarding(device: name, reason: "cannot forward to \(p): it is in mode external", field: "peer")
            }
        }
        if mode == .external, let from = forwarders(to: name, in: model).first {
            throw .deviceForwarding(device: name, reason: "cannot be external: \(from) forwards to it", field: "mode")
        }
    }

    /// The devices that forward to `name`.
    func forwarders(to name: String, in model: ManagerModel) -> [String] {
        model.devices.values.compactMap { e -> String? in
            guard let a = e.active, a.mode == .forward, a.peer == name else { return nil }
            return a.name
        }.sorted()
    }
}
