import TunKit

// MARK: - What changed outside the API

extension DeviceManager {
    /// What one look at a device found in the kernel, read without the control lock.
    struct Observed {
        /// The device's name now (TUNGETIFF on its own fd).
        var name: String?
        /// Its link and namespace, on the rounds that look at links.
        var link: (LinkInfo, Netns.Place)?
        /// Queues the daemon accounted for when the link was read: a link read while a
        /// change added or removed queues is not compared (the next look is).
        var accounted = 0
        var settings: DeviceSettings?
        /// Each queue's attach state, by queue key.
        var attached: [UInt64: Bool] = [:]
        /// Revoked files found attached again.
        var revokedAttached: [QueueHandle] = []
        var lost = false
    }

    /// Compares each queue's attach state, read from the daemon's fd, with the last one the
    /// daemon knew: a difference was made by someone else (a lease holder's TUNSETQUEUE, or
    /// another process sharing the open file), and becomes a `queue.enabled`/`disabled`
    /// event. It also follows each device's name (a rename behind the daemon's back is logged
    /// and saved, so a restart finds the device under its new name) and, once a second, the
    /// queues others attached by name, the namespace it is in and its settings.
    ///
    /// The kernel is read without the control lock, from the published state (`look`); only
    /// what differs is taken under the lock, read again there and acted on (`apply`), so it
    /// never mistakes the API's own change for another's, and in the steady state it makes
    /// no syscall under the lock at all.
    func observe() {
        let lookAtLinks = observeTicks.add(1, ordering: .relaxed).newValue % 5 == 0
        let snapshot = published.withLock { $0.devices }
        var looks: [UInt64: Observed] = [:]
        for case .active(let d) in snapshot.values { looks[d.key] = look(at: d, links: lookAtLinks) }
        for (key, o) in looks where o.lost { scheduleLost(key: key) }
        control.withLock { model in
            journal.hold()
            defer { journal.release(deliver: true) }
            var changed = false
            var renamed = false
            for case .active(var d) in model.devices.values {
                guard let o = looks[d.key], !o.lost else { continue }
                if apply(o, to: &d, renamed: &renamed) {
                    model.devices[d.name] = .active(d)
                    changed = true
                }
            }
            if renamed { _ = save(&model) }
            if changed {
                let copy = model.forReaders
                published.withLock { $0 = copy }
            }
        }
    }

    /// Reads what the kernel has of `d` through its files, each kept open for its read.
    private func look(at d: ActiveDevice, links: Bool) -> Observed {
        let driver = self.driver
        var o = Observed()
        func lost(_ e: SyscallError) -> Bool { e.errno == .badFileDescriptorState }
        if let file = d.anyFile {
            switch file.withOpenFD({ fd in Result { () throws(SyscallError) in try driver.boundName(fd) } }) {
            case .success(let n)?: o.name = n
            case .failure(let e)? where lost(e): o.lost = true
            case .failure(let e)?: logger.debug("device name not read", metadata: ["device": "\(d.name)", "error": "\(e)"])
            case nil: break
            }
        }
        if links {
            do throws(SyscallError) {
                o.link = try lookUp(d)
                // A device the daemon holds no queue of is gone when its index is (read, and
                // found to be nothing; a failed look says nothing).
                if o.link == nil, d.anyFile == nil, d.anchor != nil { o.lost = true }
                o.accounted = d.accountedQueues
                if let (link, _) = o.link { o.settings = try readSettings(d, link: link) }
            } catch {
                logger.debug("device link not read", metadata: ["device": "\(d.name)", "error": "\(error)"])
            }
        }
        for r in d.revoked where r.file.withOpenFD({ (try? driver.isAttached($0)) ?? false }) == true {
            o.revokedAttached.append(r.file)
        }
        for q in d.queues.values {
            switch q.file.withOpenFD({ fd in Result { () throws(SyscallError) in try driver.isAttached(fd) } }) {
            case .success(let a)?: o.attached[q.key] = a
            // Deleted behind our back: noticed here even when no worker reads the device
            // (all its queues detached or leased).
            case .failure(let e)? where lost(e): o.lost = true
            case .failure, nil: break
            }
        }
        return o
    }

    /// Acts, under the control lock, on what `look` found different from the model; every
    /// decision is made on a read taken again here. Returns whether `d` changed.
    private func apply(_ o: Observed, to d: inout ActiveDevice, renamed: inout Bool) -> Bool {
        var touched = false
        // A name that looked different is read again here before it is taken.
        if let seenName = o.name, seenName != d.kernelName, let fd = d.anyFD,
           let now = try? driver.boundName(fd), now != d.kernelName {
            logger.warning("device renamed in the kernel; the API keeps its name",
                           metadata: ["device": "\(d.name)", "from": "\(d.kernelName)", "to": "\(now)"])
            d.kernelName = now
            touched = true
            renamed = true
        }
        if var (link, place) = o.link, o.accounted == d.accountedQueues {
            // A count of others' queues, or a place, that looked different is read again here
            // (a change may have come and gone since the look).
            if foreignQueues(d, link) != d.foreignQueues || place != d.place {
                guard let fresh = try? lookUp(d) else { return applyRest(o, to: &d, touched: touched) }
                (link, place) = fresh
            }
            if followLink(link, place, of: &d, renamed: &renamed) { touched = true }
            let foreign = foreignQueues(d, link)
            // A holder's settings: put back once the daemon holds the device alone, and the
            // workers kept off it while they cannot read it. Looked at again (under the lock)
            // only when what was read differs from what the daemon knows or wants.
            if let s = o.settings, s != d.settings || unreadableReason(d, s) != d.unreadable
                || (d.leases.isEmpty && foreign == 0 && !differences(d, s).isEmpty),
               checkSettings(&d, foreign: foreign, link: link, why: "observed") {
                touched = true
            }
        }
        return applyRest(o, to: &d, touched: touched)
    }

    /// The consumer's hold, revoked files and queues' attach states: what `apply` does after
    /// the name and the link.
    private func applyRest(_ o: Observed, to d: inout ActiveDevice, touched: Bool) -> Bool {
        var touched = touched
        // A hand-over that failed half-way (a lease's end, say) is tried again.
        let hold = holdsQueues(d)
        if d.queues.values.contains(where: { $0.lease == nil && $0.held != hold }) {
            applyConsumerLogged(&d)
            touched = true
        }
        if detachRevoked(o, of: &d) { touched = true }
        for q in d.queues.values {
            guard let seenNow = o.attached[q.key] else { continue }
            let heldButAttached = q.lease == nil && q.held && seenNow
            guard seenNow != q.knownAttached || heldButAttached else { continue }
            if followQueue(q, of: &d) { touched = true }
        }
        return touched
    }

    /// The queues others attached by name, and where the device is: its namespace and index.
    private func followLink(_ link: LinkInfo, _ place: Netns.Place, of d: inout ActiveDevice, renamed: inout Bool) -> Bool {
        var touched = false
        let foreign = foreignQueues(d, link)
        if foreign != d.foreignQueues {
            logger.warning("queues attached by another process", metadata: [
                "device": "\(d.name)", "foreign_queues": "\(foreign)", "was": "\(d.foreignQueues)"])
            d.foreignQueues = foreign
            touched = true
        }
        guard place != d.place else { return touched }
        if d.place != nil {
            logger.info("device moved to another network namespace", metadata: [
                "device": "\(d.name)", "netns_inode": "\(place.inode)", "netns": "\(place.name ?? "")"])
        }
        d.place = place
        d.ifindex = link.ifindex
        // Where a restart finds it (or makes it) from now on: its namespace, never the host's
        // once it left it.
        let home = place.isOwn ? nil
            : NetnsHome(path: place.name.map { "/run/netns/" + $0 } ?? (d.home?.inode == place.inode ? d.home?.path : nil),
                        inode: place.inode)
        if home != d.home {
            d.home = home
            renamed = true
        }
        return true
    }

    /// A revoked lease's file re-attached by its former holder: detached again.
    private func detachRevoked(_ o: Observed, of d: inout ActiveDevice) -> Bool {
        var touched = false
        for i in d.revoked.indices where o.revokedAttached.contains(where: { $0 === d.revoked[i].file }) {
            let r = d.revoked[i]
            guard (try? driver.isAttached(r.file.fd)) == true else { continue }
            do throws(SyscallError) {
                try driver.setQueue(r.file.fd, enabled: false)
            } catch {
                logger.error("a revoked lease's file is attached again and was not detached",
                             metadata: ["device": "\(d.name)", "queue": "\(r.id)", "error": "\(error)"])
                continue
            }
            d.revoked[i].refusals += 1
            touched = true
            journal.publish(.queueDisabled, device: d.name, queue: r.id, lease: r.lease, by: .daemon,
                            changes: [("revoked", .bool(true)), ("refusals", .int(d.revoked[i].refusals))])
            logger.warning("a revoked lease's file was attached again by its former holder; detached",
                           metadata: ["device": "\(d.name)", "queue": "\(r.id)", "lease": "\(r.lease)",
                                      "refusals": "\(d.revoked[i].refusals)"])
        }
        return touched
    }

    /// A queue whose attach state looked different from the one the daemon knew: read again
    /// under the lock, and followed (an event) or, held for the consumer, detached again.
    private func followQueue(_ q: QueueEntry, of d: inout ActiveDevice) -> Bool {
        guard let attached = try? driver.isAttached(q.fd) else { return false }
        if q.lease == nil, q.held, attached {
            // Held for the device's consumer, attached by someone sharing the file (a former
            // holder): detached again.
            do throws(SyscallError) {
                try driver.setQueue(q.fd, enabled: false)
                journal.publish(.queueDisabled, device: d.name, queue: q.id, by: .daemon)
                logger.warning("a held queue was attached by another holder of its file; detached",
                               metadata: ["device": "\(d.name)", "queue": "\(q.id)"])
                d.queues[q.id]!.knownAttached = false
                return true
            } catch {
                logger.error("a held queue is attached by another holder of its file and was not detached",
                             metadata: ["device": "\(d.name)", "queue": "\(q.id)", "error": "\(error)"])
            }
        }
        guard attached != q.knownAttached else { return false }
        d.queues[q.id]!.knownAttached = attached
        journal.publish(attached ? .queueEnabled : .queueDisabled, device: d.name, queue: q.id,
                        lease: q.lease, by: q.lease == nil ? .kernel : .holder)
        return true
    }
}
