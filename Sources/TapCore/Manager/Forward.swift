import Logging
import Synchronization
import TunKit

typealias Offloads = TunOffloads

extension DeviceManager {
    /// The peer queues a forwarding device writes to: attached through the API and not leased,
    /// in id order (a detached queue's fd refuses writes; a leased one is its holder's).
    func peerQueues(of d: ActiveDevice, in model: ManagerModel) -> [QueueEntry] {
        guard d.mode == .forward, let name = d.peer, case .active(let p)? = model.devices[name] else { return [] }
        return p.sortedQueues.filter { $0.enabled && $0.lease == nil && !$0.held }
    }

    /// What the workers do with `d`'s frames (for `forward`, the target last pushed).
    func action(for d: ActiveDevice) -> QueueAction {
        .of(d.mode, kind: d.kind, vnetHdr: d.vnetHdr, target: d.forwardTarget)
    }

    /// Brings every forwarding device's workers up to date with its peer's queues, and stops
    /// the ones no longer forwarding. Returns once every worker has its new target, and with
    /// it has let go of the old one: the duplicates of the peer's fds the old target owned are
    /// closed then, so a queue the peer removed is gone from the kernel when the change answers.
    func retarget(_ model: inout ManagerModel) {
        for case .active(var d) in model.devices.values {
            guard d.mode == .forward else {
                if d.forwardTarget != nil {
                    d.forwardTarget = nil
                    model.devices[d.name] = .active(d)
                }
                continue
            }
            let queues = peerQueues(of: d, in: model)
            if let current = d.forwardTarget, current.keys == queues.map(\.key) { continue }
            var parts: [ForwardTarget.Queue] = []
            for q in queues {
                do {
                    parts.append(.init(key: q.key, file: OwnedFDBox(try driver.duplicate(q.fd)), counters: q.counters))
                } catch {
                    // Out of fds: that queue is left out (its frames go to the others) and the
                    // next change tries again.
                    logger.error("peer queue not usable for forwarding", metadata: [
                        "device": "\(d.name)", "peer": "\(d.peer ?? "")", "error": "\(error)"])
                }
            }
            let target = ForwardTarget(parts)
            d.forwardTarget = target
            model.devices[d.name] = .active(d)
            for q in d.queues.values where q.polled { pool.setAction(key: q.key, .forward(target), on: q.worker) }
        }
    }

    /// Refuses a forwarding setup that cannot work; checked before anything is touched.
    func checkForward(name: String, kind: DeviceKind, vnetHdr: Bool, mode: DeviceMode, peer: String?,
                      in model: ManagerModel) throws(ManagerError) {
        // A peer is a device name: one that could never be a device is the request's fault.
        if let peer { try Validate.name(peer, field: "peer") }
        switch (mode, peer) {
        case (.forward, nil):
            throw .invalidField(field: "peer", reason: "mode forward needs a peer device")
        case (.forward, let p?) where p == name:
            throw .invalidField(field: "peer", reason: "a device cannot forward to itself")
        case (.forward, let p?):
            guard case .active(let other)? = model.devices[p] else { throw .peerUnavailable(device: name, peer: p) }
            if other.kind != kind { throw .peerMismatch(field: "type", peer: p) }
            if other.vnetHdr != vnetHdr { throw .peerMismatch(field: "vnet_hdr", peer: p) }
        case (_, _?):
            throw .invalidField(field: "peer", reason: "a peer is only for mode forward")
        case (_, nil):
            break
        }
    }

    /// Sets the offloads a spec asks for: CSUM, TSO4, TSO6, and USO4/USO6 where the kernel
    /// takes them. Returns what was set.
    func setOffloads(_ name: String, fd: Int32) throws(ManagerError) -> Offloads {
        let full: Offloads = [.csum, .tso4, .tso6, .uso4, .uso6]
        do {
            try driver.setOffload(fd, full)
            return full
        } catch where error.errno == .invalidArgument {
            let base: Offloads = [.csum, .tso4, .tso6]
            try step(name, .setOffload) { () throws(SyscallError) in try driver.setOffload(fd, base) }
            return base
        } catch {
            throw ManagerError.from(error, device: name, step: .setOffload)
        }
    }
}
