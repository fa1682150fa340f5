import TunKit

// MARK: - The kernel side of the manager: reads through a device's own files, and by-name
// steps that reach a device wherever it is now

extension DeviceManager {
    /// Runs `read` on one of the device's files while it is open. nil when the file was
    /// closed since the snapshot, or the device went (EBADFD): the workers, or the next read,
    /// report that. Any other failure is thrown.
    func read<T>(through file: QueueHandle, _ read: (Int32) throws(SyscallError) -> T?) throws(SyscallError) -> T? {
        let r = file.withOpenFD { fd -> Result<T?, SyscallError> in
            do throws(SyscallError) {
                return .success(try read(fd))
            } catch {
                return error.errno == .badFileDescriptorState ? .success(nil) : .failure(error)
            }
        }
        return try (r ?? .success(nil)).get()
    }

    /// The device's link and namespace, through a queue fd while it is open (the snapshot
    /// may be older than a close), or through its anchor; nil if there is neither or the
    /// device went.
    func lookUp(_ d: ActiveDevice) throws(SyscallError) -> (LinkInfo, Netns.Place)? {
        if d.anyFile == nil, let a = d.anchor {
            guard let link = try anchoredLink(a) else { return nil }
            let own = a.netns == nil
            let inode = if let ns = a.netns { ns.inode } else { try Netns.currentInode() }
            return (link, Netns.Place(inode: inode, name: own ? nil : Netns.name(ofInode: inode), isOwn: own))
        }
        guard let file = d.anyFile else { return nil }
        return try read(through: file) { fd throws(SyscallError) -> (LinkInfo, Netns.Place)? in
            guard let link = try link(of: fd) else { return nil }
            return (link, try driver.place(of: fd))
        }
    }

    /// The link of a device the daemon holds no queue of, by its index in its namespace; nil
    /// if it is gone.
    func anchoredLink(_ a: LinkAnchor) throws(SyscallError) -> LinkInfo? {
        let driver = self.driver
        let ifindex = a.ifindex
        return try driver.inNamespace(a.netns?.fd) { () throws(SyscallError) -> LinkInfo? in try driver.link(ifindex: ifindex) }
    }

    /// Runs a by-name step on `d` wherever it is: through one of its files (the name it has
    /// now, in its namespace); when the daemon holds none, through its anchor (its index in its
    /// namespace); with neither, by the name last seen. The one way by-name steps reach a device.
    func onDevice<T: Sendable>(_ d: ActiveDevice, _ body: @escaping @Sendable (String) throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        if let fd = d.anyFD { return try onLink(fd, body) }
        if let a = d.anchor { return try onAnchor(a, body) }
        return try body(d.kernelName)
    }

    /// Runs a by-name step on an anchored device: with the name it has now, in its namespace.
    func onAnchor<T: Sendable>(_ a: LinkAnchor, _ body: @escaping @Sendable (String) throws(SyscallError) -> T) throws(SyscallError) -> T {
        let driver = self.driver
        let ifindex = a.ifindex
        return try driver.inNamespace(a.netns?.fd) { () throws(SyscallError) -> T in
            guard let link = try driver.link(ifindex: ifindex) else {
                throw SyscallError(call: "RTM_GETLINK(\(ifindex))", errno: .noDevice)
            }
            return try body(link.name)
        }
    }

    /// The link of the device `fd` (one of its queues) belongs to, wherever it is now; nil if
    /// it is gone.
    func link(of fd: Int32) throws(SyscallError) -> LinkInfo? {
        let driver = self.driver
        return try onLink(fd) { name throws(SyscallError) in try driver.link(named: name) }
    }

    /// Queues of the device that neither the daemon nor a lease's orphan accounts for: the
    /// kernel counts every attached and detached queue, whoever holds it.
    func foreignQueues(_ d: ActiveDevice, _ link: LinkInfo) -> Int {
        guard let tun = link.tun else { return 0 }
        return max(0, tun.queues - d.accountedQueues)
    }

    /// The device's link now, for a change (under the control lock): a link the kernel does
    /// not give is refused, never taken as empty. A device gone behind the daemon's back is
    /// not found (and dropped on the event path).
    func currentLink(_ d: ActiveDevice) throws(ManagerError) -> LinkInfo {
        let driver = self.driver
        let found: LinkInfo?
        do throws(SyscallError) {
            found = try onDevice(d) { n throws(SyscallError) in try driver.link(named: n) }
        } catch where error.errno == .badFileDescriptorState || error.errno == .noDevice {
            found = nil
        } catch {
            throw .from(error, device: d.name, step: .countQueues)
        }
        if let found { return found }
        // Not found by the name it had a moment ago: gone, or renamed in between.
        if vanished(.active(d)) {
            scheduleLost(key: d.key)
            throw .deviceNotFound(name: d.name)
        }
        throw .from(SyscallError(call: "RTM_GETLINK(\(d.kernelName))", errno: .noDevice), device: d.name, step: .countQueues)
    }

    /// Queues others attached, asked of the kernel now: for the limits of a change, so a
    /// count the kernel does not give is refused (never counted as 0).
    func foreignQueues(_ d: ActiveDevice) throws(ManagerError) -> Int {
        foreignQueues(d, try currentLink(d))
    }

    /// What the kernel's queue limit counts besides the daemon's own queues: queues others
    /// attached by name, and revoked files the daemon keeps (its 256 is for all of them).
    /// Every limit check counts this, asked of the kernel now (never counted as 0 unread).
    func queuesBesidesOwn(_ d: ActiveDevice) throws(ManagerError) -> Int {
        queuesBesidesOwn(d, try currentLink(d))
    }

    func queuesBesidesOwn(_ d: ActiveDevice, _ link: LinkInfo) -> Int {
        foreignQueues(d, link) + d.revoked.count
    }

    /// The same, for the steps that cannot refuse (a lease's end): nil, logged, when the
    /// kernel does not give the count.
    func foreignQueuesLogged(_ d: ActiveDevice) -> Int? {
        do throws(ManagerError) {
            return try foreignQueues(d)
        } catch {
            logger.error("queues attached by name not counted", metadata: ["device": "\(d.name)", "error": "\(error)"])
            return nil
        }
    }

    /// Runs `body` with the name the device of `fd` has now (TUNGETIFF on the fd), in the
    /// namespace the device is in now: by-name calls then reach that device and never an
    /// interface that took its old name, here or there.
    func onLink<T: Sendable>(_ fd: Int32, _ body: @escaping @Sendable (String) throws(SyscallError) -> T)
        throws(SyscallError) -> T {
        let name = try driver.boundName(fd)
        if let v = try driver.inDeviceNamespace(fd, { () throws(SyscallError) -> T in try body(name) }) { return v }
        return try body(name)
    }

    /// The kernel's counters of the device, found through its own fd; nil if it is gone.
    func linkStatistics(_ d: ActiveDevice) throws(SyscallError) -> [String: UInt64]? {
        if d.anyFile == nil, let a = d.anchor { return try anchoredLink(a)?.statistics }
        guard let file = d.anyFile else { return nil }
        return try read(through: file) { fd throws(SyscallError) in try link(of: fd)?.statistics }
    }

    func vanished(_ entry: DeviceEntry) -> Bool {
        // An anchored device is gone when its index is (a failed look says nothing).
        if entry.active?.anyFile == nil, let a = entry.active?.anchor,
           case .success(nil) = Result(catching: { () throws(SyscallError) in try anchoredLink(a) }) {
            return true
        }
        guard let file = entry.active?.anyFile else { return false }
        // A queue closed since the snapshot was taken says nothing: not vanished.
        return file.withOpenFD { !driver.isBound($0) } ?? false
    }

    /// The kernel's attach state of a queue, read from the daemon's fd: nil if it was closed
    /// since the snapshot or the device went, a failure if the kernel refused.
    func attached(_ q: QueueEntry) -> Result<Bool?, SyscallError> {
        let driver = self.driver
        return Result { () throws(SyscallError) in try read(through: q.file) { fd throws(SyscallError) in try driver.isAttached(fd) } }
    }
}
