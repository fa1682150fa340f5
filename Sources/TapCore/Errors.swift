import TunKit

/// A kernel step of building or changing a device: what an error says failed.
public enum DeviceStep: String, Sendable, Hashable {
    case openQueue = "open queue"
    case attachQueue = "attach queue"
    case detachQueue = "detach queue"
    case setPersist = "set persist"
    case setMAC = "set MAC address"
    case setMTU = "set MTU"
    case readMTU = "read MTU"
    case readMAC = "read MAC address"
    case setLinkUp = "set link state"
    case readIfindex = "read ifindex"
    case pollQueue = "poll queue"
    /// Looking at what has the name now (sysfs), before restoring a device.
    case inspect = "inspect interface"
    case readQueueState = "read queue state"
    /// The kernel's count of the device's queues, for a limit check.
    case countQueues = "count the device's queues"
    case setOffload = "set offloads"
    case duplicateFD = "duplicate queue fd"
    case deleteLink = "delete link"
    case setOwner = "set owner"
    case setGroup = "set group"
}

/// Everything the manager can refuse or fail with. The API maps each case to one HTTP
/// status and `code` in one place; the manager only decides which case applies.
public enum ManagerError: Error, Equatable, Sendable {
    /// A field's value is out of its domain (bad name, negative count, MTU out of range…).
    case invalidField(field: String, reason: String)
    case deviceNotFound(name: String)
    case queueNotFound(device: String, id: Int)
    /// The name belongs to an interface that exists already (ours or not).
    case nameConflict(name: String, errno: Errno?)
    /// More queues than the device's `max_queues`, the global limit or the kernel allow.
    case queueLimitExceeded(device: String, limit: Int, requested: Int, errno: Errno?, field: String = "queues")
    /// A device limit was asked above the global limit (a conflict with the current global
    /// limit, which can be raised, rather than a malformed value).
    case aboveGlobalLimit(field: String, value: Int, limit: Int)
    /// A limit was asked lower than what a device already uses.
    case limitBelowUsage(field: String, limit: Int, device: String, inUse: Int)
    /// Removing the device's last queue would destroy it; delete the device instead.
    case lastQueue(device: String, id: Int)
    /// The process or the system ran out of something (EMFILE, ENFILE, ENOMEM, ENOBUFS).
    case resourceExhausted(device: String, step: DeviceStep, call: String, errno: Errno)
    /// The device is kept from the state file but not held (its status says why).
    case deviceNotActive(name: String, status: DeviceStatus)
    /// The kernel lacks a tun feature (`TUNGETFEATURES`); `field` names the spec field that
    /// asks for it, nil when the daemon itself needs it.
    case featureMissing(feature: String, field: String?)
    /// The manager is stopping: no change is accepted any more.
    case shuttingDown
    /// A lease holds the queue: it cannot be removed or leased again.
    case queueLeased(device: String, id: Int, lease: String)
    /// The device has leases: deleting it needs `force` (which revokes them).
    case deviceLeased(device: String, leases: [String])
    case leaseNotFound(device: String, id: String)
    /// A lease asked for a queue the device does not have (the request's `queues` names it).
    case leasedQueueNotFound(device: String, id: Int)
    /// `enabled_queues` above the queue count the device would have.
    case notEnoughQueues(device: String, queues: Int, enabled: Int)
    /// The forwarding peer does not exist or is not active.
    case peerUnavailable(device: String, peer: String)
    /// The forwarding peer differs in `field` (type, vnet_hdr).
    case peerMismatch(field: String, peer: String)
    /// Another consumer has the device (its mode is `external`, or a lease lives): the
    /// daemon's own queues stay detached, so attaching one is refused.
    case queuesHeld(device: String, consumer: Consumer, leases: [String])
    /// One consumer per device: a leased device is never forwarded to or from, and a device
    /// that forwards or is forwarded to is not leased or made external.
    case deviceForwarding(device: String, reason: String, field: String?)
    /// As many leases live as the daemon takes (`--max-leases`).
    case leaseLimit(limit: Int)
    /// `netns` names no file.
    case netnsNotFound(path: String)
    /// A one-queue device (not IFF_MULTI_QUEUE) cannot have another queue.
    case notMultiQueue(device: String)
    /// A one-queue device's lease cannot be revoked (its queue cannot be detached).
    case cannotRevoke(device: String)
    /// Another consumer already has the device (queues attached by name, mode external).
    case consumerConflict(device: String, reason: String)
    /// The change was made but the state file could not be written.
    case stateNotSaved(path: String, call: String, errno: Errno)
    /// The kernel refused a step for another reason; the errno says which.
    case kernel(device: String, step: DeviceStep, call: String, errno: Errno)

    /// The errno behind the error, when the kernel refused.
    public var errno: Errno? {
        switch self {
        case .nameConflict(_, let e), .queueLimitExceeded(_, _, _, let e, _): return e
        case .resourceExhausted(_, _, _, let e), .kernel(_, _, _, let e), .stateNotSaved(_, _, let e): return e
        default: return nil
        }
    }

    /// The field a client should fix, when one is to blame.
    public var field: String? {
        switch self {
        case .invalidField(let f, _), .limitBelowUsage(let f, _, _, _), .aboveGlobalLimit(let f, _, _): return f
        case .featureMissing(_, let f): return f
        case .notEnoughQueues: return "enabled_queues"
        case .leasedQueueNotFound: return "queues"
        case .peerUnavailable: return "peer"
        case .peerMismatch(let f, _): return f
        case .deviceForwarding(_, _, let f): return f
        case .queueLimitExceeded(_, _, _, _, let f): return f
        case .netnsNotFound: return "netns"
        case .notMultiQueue: return "queues"
        default: return nil
        }
    }

    /// A short sentence for people; it does not repeat the errno, which travels apart.
    public var message: String {
        switch self {
        case .invalidField(let field, let reason):
            return "\(field): \(reason)"
        case .deviceNotFound(let name):
            return "no device named \(name)"
        case .queueNotFound(let device, let id):
            return "device \(device) has no queue \(id)"
        case .nameConflict(let name, _):
            return "an interface named \(name) already exists"
        case .queueLimitExceeded(let device, let limit, let requested, let errno, _):
            if errno != nil {
                return "the kernel refused more queues on \(device) (its limit is \(Tun.kernelMaxQueues))"
            }
            return "\(device) would have \(requested) queues; the limit is \(limit)"
        case .aboveGlobalLimit(let field, let value, let limit):
            return "\(field) \(value) is above the global limit \(limit)"
        case .limitBelowUsage(let field, let limit, let device, let inUse):
            return "\(field) \(limit) is below the \(inUse) queues device \(device) has"
        case .lastQueue(let device, let id):
            return "queue \(id) is the last queue of \(device); delete the device instead"
        case .resourceExhausted(let device, let step, let call, _):
            return "out of resources: \(step.rawValue) for \(device) failed in \(call)"
        case .deviceNotActive(let name, let status):
            return "\(name) is not active (\(status.name)): \(status.reason ?? "")"
        case .featureMissing(let feature, let field):
            return (field.map { "\($0): " } ?? "") + "this kernel's tun driver lacks \(feature)"
        case .shuttingDown:
            return "the daemon is shutting down; no change is accepted"
        case .queueLeased(let device, let id, let lease):
            return "queue \(id) of \(device) is leased (\(lease))"
        case .deviceLeased(let device, let leases):
            return "\(device) has leases (\(leases.joined(separator: ", "))); revoke them, or delete with ?force=true"
        case .leaseNotFound(let device, let id):
            return "device \(device) has no lease \(id)"
        case .leasedQueueNotFound(let device, let id):
            return "queues: device \(device) has no queue \(id)"
        case .peerUnavailable(let device, let peer):
            return "\(device) cannot forward to \(peer): no active device has that name"
        case .peerMismatch(let field, let peer):
            return "the peer \(peer) differs in \(field); both ends of a forward must agree"
        case .notEnoughQueues(let device, let queues, let enabled):
            return "enabled_queues \(enabled) is above the \(queues) queues \(device) would have"
        case .queuesHeld(let device, let consumer, let leases):
            switch consumer {
            case .lease:
                return "\(device) is leased (\(leases.joined(separator: ", "))): the queues no lease holds stay detached while one lives, "
                    + "so the holder gets every frame"
            default:
                return "\(device) is in mode external: its own queues stay detached, so the queues attached by name get every frame; "
                    + "change its mode to attach them"
            }
        case .deviceForwarding(let device, let reason, _):
            return "\(device) \(reason): a device has one consumer at a time"
        case .netnsNotFound(let path):
            return "netns: \(path) does not exist"
        case .notMultiQueue(let device):
            return "\(device) is a one-queue device (multi_queue: false): it cannot have more queues"
        case .cannotRevoke(let device):
            return "\(device) is a one-queue device: its queue cannot be detached from its holder; DELETE it with ?force=true to cut the holder off"
        case .consumerConflict(let device, let reason):
            return "\(device) \(reason): a device has one consumer at a time"
        case .leaseLimit(let limit):
            return "\(limit) leases are live, as many as the daemon takes (--max-leases); end one first"
        case .stateNotSaved(let path, let call, _):
            return "the change was made but the state file \(path) was not saved (\(call))"
        case .kernel(let device, let step, let call, _):
            return "\(step.rawValue) for \(device) failed in \(call)"
        }
    }

    /// Classifies a failed kernel step: exhaustion, a name taken, the kernel's queue limit,
    /// or a plain kernel error.
    static func from(_ error: SyscallError, device: String, step: DeviceStep, queuesRequested: Int = 0) -> ManagerError {
        switch error.errno {
        case .tooManyOpenFiles, .fileTableFull, .noMemory, .noBufferSpace:
            return .resourceExhausted(device: device, step: step, call: error.call, errno: error.errno)
        case .tooBig where step == .openQueue || step == .attachQueue:
            return .queueLimitExceeded(device: device, limit: Tun.kernelMaxQueues,
                                       requested: queuesRequested, errno: error.errno)
        default:
            return .kernel(device: device, step: step, call: error.call, errno: error.errno)
        }
    }
}

extension ManagerError: CustomStringConvertible {
    public var description: String {
        if let e = errno { return "\(message) (\(e.name))" }
        return message
    }
}
