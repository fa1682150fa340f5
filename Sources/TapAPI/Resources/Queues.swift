import TapCore
import TapJSON

/// `/v1/devices/{name}/queues` and `/v1/devices/{name}/queues/{id}`.
enum QueuesResource {
    /// POST body: optional `{"count": k}`.
    static func decodeAdd(_ bytes: [UInt8]) throws(APIError) -> Int {
        let b = try Body(bytes, allowed: ["count"], required: false)
        return try b.int("count", in: Validate.queueCountRange) ?? 1
    }

    /// PATCH body: `{"enabled": bool}`.
    static func decodePatch(_ bytes: [UInt8]) throws(APIError) -> Bool {
        let b = try Body(bytes, allowed: ["enabled"])
        return try b.required("enabled", b.bool("enabled"))
    }

    static func encode(_ c: CounterValues) -> JSONObject {
        [
            "rx_packets": JSON(c.rxPackets), "rx_bytes": JSON(c.rxBytes),
            "tx_packets": JSON(c.txPackets), "tx_bytes": JSON(c.txBytes),
            "rx_errors": JSON(c.rxErrors), "tx_errors": JSON(c.txErrors), "dropped": JSON(c.dropped),
        ]
    }

    static func encode(_ q: QueueInfo) -> JSON {
        var o: JSONObject = ["id": JSON(q.id), "enabled": .bool(q.enabled)]
        if let w = q.worker { o["worker"] = JSON(w) }
        o["counters"] = .object(encode(q.counters))
        if let since = q.since { o["since"] = .string(since) }
        o["leased"] = .bool(q.leased)
        if let l = q.lease { o["lease"] = .string(l) }
        if let s = q.leaseState { o["lease_state"] = .string(s.rawValue) }
        return .object(o)
    }

    static func list(_ m: DeviceManager, _ device: String) throws -> HTTPResponse {
        .json(200, ["queues": .array(try m.queues(device).map(encode))])
    }

    static func add(_ m: DeviceManager, _ device: String, _ r: HTTPRequest) throws -> HTTPResponse {
        let added = try m.addQueues(device, count: decodeAdd(r.body))
        return .json(201, ["queues": .array(added.map(encode))])
    }

    static func get(_ m: DeviceManager, _ device: String, _ id: Int) throws -> HTTPResponse {
        .json(200, encode(try m.queue(device, id: id)))
    }

    static func patch(_ m: DeviceManager, _ device: String, _ id: Int, _ r: HTTPRequest) throws -> HTTPResponse {
        .json(200, encode(try m.setQueueEnabled(device, id: id, decodePatch(r.body))))
    }

    static func delete(_ m: DeviceManager, _ device: String, _ id: Int) throws -> HTTPResponse {
        try m.removeQueue(device, id: id)
        return .noContent
    }
}
