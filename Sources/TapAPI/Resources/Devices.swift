import TapCore
import TapJSON
import TunKit

/// `/v1/devices` and `/v1/devices/{name}`.
enum DevicesResource {
    static let specFields = ["name", "type", "queues", "max_queues", "persist", "vnet_hdr", "mtu", "mac", "up", "mode",
                             "peer", "offload", "owner", "group", "netns", "ifname", "multi_queue", "labels"]
    static let patchFields = ["max_queues", "up", "mtu", "mode", "queues", "enabled_queues", "peer"]

    /// DeviceSpec from a POST body. Types and the schema's ranges are checked here, before
    /// any arithmetic; names and the rules that depend on state by the manager.
    static func decodeSpec(_ bytes: [UInt8]) throws(APIError) -> DeviceSpec {
        let b = try Body(bytes, allowed: specFields)
        var spec = DeviceSpec(name: try b.required("name", b.string("name")))
        if let kind = try b.oneOf("type", DeviceKind.self) { spec.kind = kind }
        if let q = try b.int("queues", in: Validate.queueCountRange) { spec.queues = q }
        spec.maxQueues = try b.int("max_queues", in: Validate.queueCountRange)
        if let p = try b.bool("persist") { spec.persist = p }
        if let v = try b.bool("vnet_hdr") { spec.vnetHdr = v }
        spec.mtu = try b.int("mtu", in: Validate.mtuRange)
        if let text = try b.string("mac") {
            guard let mac = MACAddress(text) else {
                throw APIError.invalidField("mac", "must be six hex bytes like 02:00:00:00:00:01")
            }
            spec.mac = mac
        }
        if let up = try b.bool("up") { spec.up = up }
        if let mode = try b.oneOf("mode", DeviceMode.self) { spec.mode = mode }
        spec.peer = try b.string("peer")
        if let o = try b.bool("offload") { spec.offload = o }
        // An id: (uid_t)-1 means "none" to the kernel, so it is never one. Names are the
        // client's to resolve (the CLI does), so that what a request means never depends on
        // this host's user database.
        spec.owner = try b.int("owner", in: 0...Int(UInt32.max - 1)).map(UInt32.init)
        spec.group = try b.int("group", in: 0...Int(UInt32.max - 1)).map(UInt32.init)
        spec.netns = try b.string("netns")
        spec.ifname = try b.string("ifname")
        if let m = try b.bool("multi_queue") { spec.multiQueue = m }
        if let labels = try b.stringMap("labels") { spec.labels = labels }
        return spec
    }

    static func decodePatch(_ bytes: [UInt8]) throws(APIError) -> DevicePatch {
        let b = try Body(bytes, allowed: patchFields, fixed: specFields.filter { !patchFields.contains($0) })
        return DevicePatch(maxQueues: try b.int("max_queues", in: Validate.queueCountRange), up: try b.bool("up"),
                           mtu: try b.int("mtu", in: Validate.mtuRange),
                           mode: try b.oneOf("mode", DeviceMode.self),
                           queues: try b.int("queues", in: Validate.queueCountRange),
                           enabledQueues: try b.int("enabled_queues", in: 0...Tun.kernelMaxQueues),
                           peer: try b.string("peer"))
    }

    static func encode(_ d: DeviceInfo) -> JSON {
        var o: JSONObject = [
            "name": .string(d.name), "type": .string(d.kind.rawValue), "max_queues": JSON(d.maxQueues),
            "max_queues_source": .string(d.maxQueuesSource.rawValue),
            "persist": .bool(d.persist), "vnet_hdr": .bool(d.vnetHdr),
        ]
        if let mtu = d.mtu { o["mtu"] = JSON(mtu) }
        if let mac = d.mac { o["mac"] = .string(mac.description) }
        o["up"] = .bool(d.up)
        o["mode"] = .string(d.mode.rawValue)
        if let p = d.peer { o["peer"] = .string(p) }
        if let s = d.peerState { o["peer_state"] = .string(s.rawValue) }
        o["offload"] = .bool(d.offload)
        o["offloads"] = .array(d.offloads.map { .string($0) })
        // 0 for a device that is not active, as the API has always answered.
        o["ifindex"] = JSON(d.ifindex ?? 0)
        if let u = d.owner { o["owner"] = JSON(Int(u)) }
        if let g = d.group { o["group"] = JSON(Int(g)) }
        if let k = d.kernel {
            o["kernel_name"] = .string(k.name)
            o["foreign_queues"] = JSON(k.foreignQueues)
            o["consumer"] = .string(d.consumer.rawValue)
            if let size = d.vnetHdrSize { o["vnet_hdr_size"] = JSON(size) }
            o["settings_differ"] = .array(d.settingsDiffer.map { .string($0) })
            o["revoked_queues"] = JSON(d.revokedQueues)
            // A kernel read that failed: the values above are the last recorded.
            if let e = d.kernelError { o["kernel_error"] = StatsResource.encode(e) }
            if let ns = k.netns {
                var n: JSONObject = ["inode": JSON(Int(ns.inode)), "own": .bool(ns.isOwn)]
                if let name = ns.name { n["name"] = .string(name) }
                o["netns"] = .object(n)
            }
        }
        if let h = d.home {
            // Where a restart finds it (a kept one: where it was): the path and the namespace.
            var n: JSONObject = ["inode": JSON(Int(truncatingIfNeeded: h.inode))]
            if let p = h.path { n["path"] = .string(p) }
            o["netns_home"] = .object(n)
        }
        o["multi_queue"] = .bool(d.multiQueue)
        if !d.labels.isEmpty {
            o["labels"] = .object(JSONObject(d.labels.sorted { $0.key < $1.key }.map { (key: $0.key, value: JSON.string($0.value)) }))
        }
        o["queue_count"] = JSON(d.queueCount)
        o["enabled_queues"] = JSON(d.enabledQueues)
        o["queues"] = .array(d.queues.map(QueuesResource.encode))
        o["state"] = .string(d.status.name)
        if let reason = d.stateReason { o["state_reason"] = .string(reason) }
        o["since"] = .string(d.since)
        return .object(o)
    }

    static func location(_ name: String) -> String { "/v1/devices/\(name)" }

    static func list(_ m: DeviceManager) -> HTTPResponse {
        .json(200, ["devices": .array(m.devices().map(encode))])
    }

    static func create(_ m: DeviceManager, _ r: HTTPRequest) throws -> HTTPResponse {
        let d = try m.create(decodeSpec(r.body))
        return .json(201, encode(d), headers: [("Location", location(d.name))])
    }

    static func get(_ m: DeviceManager, _ name: String) throws -> HTTPResponse {
        .json(200, encode(try m.device(name)))
    }

    static func patch(_ m: DeviceManager, _ name: String, _ r: HTTPRequest) throws -> HTTPResponse {
        .json(200, encode(try m.update(name, decodePatch(r.body))))
    }

    /// `?force=true` also deletes a device with leases: they are revoked, and the link is
    /// deleted by index, since the holders' fds would keep it alive.
    static func delete(_ m: DeviceManager, _ name: String, _ r: HTTPRequest) throws -> HTTPResponse {
        try m.delete(name, force: try flag(r, "force"))
        return .noContent
    }

    /// A boolean query parameter: `true` or `false`, `default` when absent.
    static func flag(_ r: HTTPRequest, _ key: String, default value: Bool = false) throws(APIError) -> Bool {
        switch r.query[key] {
        case nil: return value
        case "false"?: return false
        case "true"?: return true
        case let v?: throw APIError.invalidField(key, "must be true or false, not \(v)")
        }
    }
}
