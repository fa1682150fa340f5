import TapJSON
import TunKit

/// What users asked for, as the state file keeps it: enough to bring every device back
/// after a restart with the same queue ids, limits, modes and enabled states.
public struct DesiredState: Equatable, Sendable {
    public struct Queue: Equatable, Sendable {
        public var id: Int
        public var enabled: Bool

        public init(id: Int, enabled: Bool) {
            self.id = id
            self.enabled = enabled
        }
    }

    /// A lease as the state file keeps it, so a restart knows which queues a holder may
    /// still have.
    public struct Lease: Equatable, Sendable {
        public var id: String
        public var queues: [Int]
        public var holder: String?
        public var peer: Peer
        public var since: String

        public init(id: String, queues: [Int], holder: String?, peer: Peer, since: String) {
            self.id = id
            self.queues = queues
            self.holder = holder
            self.peer = peer
            self.since = since
        }
    }

    public struct Device: Equatable, Sendable {
        public var spec: DeviceSpec
        /// Ordered by id; leased ones included.
        public var queues: [Queue]
        /// Ordered by id.
        public var leases: [Lease]
        /// The kernel's name for it when it was renamed behind the daemon's back (nil: the
        /// spec's name): where a restart looks for a persistent device.
        public var kernelName: String?
        /// The network namespace it lives in (nil: the daemon's own): a restart finds it, or
        /// makes it, there and nowhere else.
        public var home: NetnsHome?

        public init(spec: DeviceSpec, queues: [Queue], leases: [Lease] = [], kernelName: String? = nil, home: NetnsHome? = nil) {
            self.spec = spec
            self.queues = queues
            self.leases = leases
            self.kernelName = kernelName
            self.home = home
        }
    }

    public var maxQueues: Int
    /// Ordered by name.
    public var devices: [Device]

    public init(maxQueues: Int, devices: [Device] = []) {
        self.maxQueues = maxQueues
        self.devices = devices
    }
}

/// The desired-state file (`state.json` in the state directory), written atomically after
/// every accepted change and read once at start.
public struct StateFile: Sendable {
    public let path: String
    static let version = 1

    public init(directory: String) {
        path = directory.hasSuffix("/") ? directory + "state.json" : directory + "/state.json"
    }

    public enum LoadError: Error, Equatable, Sendable {
        case unreadable(SyscallError)
        /// Not JSON, or not a state file of this version: the reason says where.
        case corrupt(String)
    }

    /// The saved state, or nil if there is none yet.
    public func load() throws(LoadError) -> DesiredState? {
        let bytes: [UInt8]?
        do {
            bytes = try Files.read(path, followingLinks: false)
        } catch {
            throw .unreadable(error)
        }
        guard let bytes else { return nil }
        do {
            return try Self.decode(JSON.parse(bytes))
        } catch let e as JSON.ParseError {
            throw .corrupt("line \(e.line), column \(e.column): \(e.message)")
        } catch let e as LoadError {
            throw e
        } catch {
            throw .corrupt("\(error)")
        }
    }

    public func save(_ state: DesiredState) throws(SyscallError) {
        var text = Self.encode(state).text
        text += "\n"
        try Files.writeAtomically(path, Array(text.utf8))
    }

    /// Moves an unusable state file out of the way (never overwritten) and returns where.
    public func setAside(stamp: String) throws(SyscallError) -> String {
        let aside = "\(path).corrupt-\(stamp)"
        try Files.move(path, to: aside)
        return aside
    }

    // MARK: - Format

    static func encode(_ s: DesiredState) -> JSON {
        let devices: [JSON] = s.devices.map { d in
            var o: JSONObject = [
                "name": .string(d.spec.name), "type": .string(d.spec.kind.rawValue),
                // The limit in force, for a reader that knows no source; the source says whether
                // the device follows the global limit.
                "max_queues": JSON(d.spec.maxQueues ?? s.maxQueues),
                "max_queues_source": .string(d.spec.maxQueues == nil ? "global" : "device"),
                "persist": .bool(d.spec.persist),
                "vnet_hdr": .bool(d.spec.vnetHdr),
            ]
            if let mtu = d.spec.mtu { o["mtu"] = JSON(mtu) }
            if let mac = d.spec.mac { o["mac"] = .string(mac.description) }
            o["up"] = .bool(d.spec.up)
            o["mode"] = .string(d.spec.mode.rawValue)
            if let p = d.spec.peer { o["peer"] = .string(p) }
            if d.spec.offload { o["offload"] = .bool(true) }
            if let u = d.spec.owner { o["owner"] = JSON(Int(u)) }
            if let g = d.spec.group { o["group"] = JSON(Int(g)) }
            if let k = d.kernelName { o["kernel_name"] = .string(k) }
            if let i = d.spec.ifname { o["ifname"] = .string(i) }
            if !d.spec.multiQueue { o["multi_queue"] = .bool(false) }
            if !d.spec.labels.isEmpty {
                o["labels"] = .object(JSONObject(d.spec.labels.sorted { $0.key < $1.key }.map { (key: $0.key, value: JSON.string($0.value)) }))
            }
            if let h = d.home {
                var n: JSONObject = ["inode": JSON(Int(truncatingIfNeeded: h.inode))]
                if let p = h.path { n["path"] = .string(p) }
                o["netns"] = .object(n)
            }
            o["queues"] = .array(d.queues.map { ["id": JSON($0.id), "enabled": .bool($0.enabled)] })
            if !d.leases.isEmpty {
                o["leases"] = .array(d.leases.map { l in
                    var lo: JSONObject = [
                        "id": .string(l.id), "queues": .array(l.queues.map { JSON($0) }), "pid": JSON(Int(l.peer.pid)),
                        "uid": JSON(Int(l.peer.uid)), "gid": JSON(Int(l.peer.gid)), "since": .string(l.since),
                    ]
                    if let h = l.holder { lo["holder"] = .string(h) }
                    return .object(lo)
                })
            }
            return .object(o)
        }
        return ["version": JSON(version), "max_queues": JSON(s.maxQueues), "devices": .array(devices)]
    }

    static func decode(_ j: JSON) throws(LoadError) -> DesiredState {
        func fail(_ what: String) -> LoadError { .corrupt(what) }
        guard case .object(let root) = j else { throw fail("not a JSON object") }
        guard root["version"] == JSON(version) else { throw fail("version is not \(version)") }
        guard case .int(let limit)? = root["max_queues"], (1...Int64(Tun.kernelMaxQueues)).contains(limit) else {
            throw fail("max_queues is missing or out of range")
        }
        guard case .array(let items)? = root["devices"] else { throw fail("devices is missing") }
        var devices: [DesiredState.Device] = []
        for (i, item) in items.enumerated() {
            let at = "devices[\(i)]"
            guard case .string(let name)? = item["name"], case .string(let type)? = item["type"],
                  let kind = DeviceKind(rawValue: type), case .int(let max)? = item["max_queues"],
                  case .bool(let persist)? = item["persist"], case .bool(let vnet)? = item["vnet_hdr"],
                  case .bool(let up)? = item["up"], case .string(let m)? = item["mode"],
                  let mode = DeviceMode(rawValue: m), case .array(let qs)? = item["queues"], !qs.isEmpty
            else { throw fail("\(at) is missing a field or has one of the wrong type") }
            // A file from before the source was kept: every limit was the device's own.
            let follows = item["max_queues_source"] == .string("global")
            var spec = DeviceSpec(name: name, kind: kind, queues: qs.count, maxQueues: follows ? nil : Int(max),
                                  persist: persist, vnetHdr: vnet, up: up, mode: mode)
            if case .int(let mtu)? = item["mtu"] { spec.mtu = Int(mtu) }
            if case .string(let p)? = item["peer"] { spec.peer = p }
            if case .bool(let o)? = item["offload"] { spec.offload = o }
            // A uid or gid; (uid_t)-1 means none to the kernel, so it is never one.
            func id(_ key: String) throws(LoadError) -> UInt32? {
                guard let v = item[key] else { return nil }
                guard case .int(let n) = v, let id = UInt32(exactly: n), id != UInt32.max else {
                    throw fail("\(at).\(key) is not a user or group id")
                }
                return id
            }
            spec.owner = try id("owner")
            spec.group = try id("group")
            var kernelName: String?
            if case .string(let k)? = item["kernel_name"] { kernelName = k }
            if case .string(let i)? = item["ifname"] { spec.ifname = i }
            if item["multi_queue"] == .bool(false) { spec.multiQueue = false }
            if case .object(let ls)? = item["labels"] {
                for (k, v) in ls.entries {
                    guard case .string(let s) = v else { throw fail("\(at).labels has a value that is not a string") }
                    spec.labels[k] = s
                }
            }
            var home: NetnsHome?
            if case .object(let n)? = item["netns"] {
                guard case .int(let ino)? = n["inode"] else { throw fail("\(at).netns has no inode") }
                var path: String?
                if case .string(let p)? = n["path"] { path = p }
                home = NetnsHome(path: path, inode: UInt64(truncatingIfNeeded: ino))
                spec.netns = path
            }
            if case .string(let mac)? = item["mac"] {
                guard let parsed = MACAddress(mac) else { throw fail("\(at).mac is not a MAC address") }
                spec.mac = parsed
            }
            var queues: [DesiredState.Queue] = []
            for q in qs {
                guard case .int(let id)? = q["id"], id >= 0, id < Int64(Tun.kernelMaxQueues),
                      case .bool(let enabled)? = q["enabled"] else { throw fail("\(at).queues has a bad entry") }
                queues.append(.init(id: Int(id), enabled: enabled))
            }
            guard Set(queues.map(\.id)).count == queues.count else { throw fail("\(at).queues repeats an id") }
            var leases: [DesiredState.Lease] = []
            if case .array(let ls)? = item["leases"] {
                for l in ls {
                    guard case .string(let id)? = l["id"], case .array(let lq)? = l["queues"],
                          case .int(let pid)? = l["pid"], case .int(let uid)? = l["uid"], case .int(let gid)? = l["gid"],
                          case .string(let since)? = l["since"] else { throw fail("\(at).leases has a bad entry") }
                    var ids: [Int] = []
                    for q in lq {
                        guard case .int(let qid) = q, queues.contains(where: { Int64($0.id) == qid }) else {
                            throw fail("\(at).leases names a queue the device does not have")
                        }
                        ids.append(Int(qid))
                    }
                    var holder: String?
                    if case .string(let h)? = l["holder"] { holder = h }
                    leases.append(.init(id: id, queues: ids, holder: holder,
                                        peer: Peer(pid: Int32(truncatingIfNeeded: pid), uid: UInt32(truncatingIfNeeded: uid),
                                                              gid: UInt32(truncatingIfNeeded: gid)), since: since))
                }
            }
            devices.append(.init(spec: spec, queues: queues.sorted { $0.id < $1.id }, leases: leases, kernelName: kernelName, home: home))
        }
        guard Set(devices.map(\.spec.name)).count == devices.count else { throw fail("a device name repeats") }
        return DesiredState(maxQueues: Int(limit), devices: devices)
    }
}
