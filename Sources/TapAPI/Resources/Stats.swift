import TapCore
import TapJSON

/// `/v1/devices/{name}/stats`: per queue, the total, and the kernel's device counters.
enum StatsResource {
    static func encode(_ s: DeviceStats) -> JSON {
        // The id, then the counters: concatenated, as the keys are known to differ.
        let queues: [JSON] = s.queues.map { q in
            .object(JSONObject([(key: "id", value: JSON(q.id))] + QueuesResource.encode(q.counters).entries))
        }
        let kernel = JSONObject(s.kernel.sorted { $0.key < $1.key }.map { (key: $0.key, value: JSON($0.value)) })
        return ["queues": .array(queues), "total": .object(QueuesResource.encode(s.total)), "kernel": .object(kernel)]
    }

    static func get(_ m: DeviceManager, _ device: String) throws -> HTTPResponse {
        .json(200, encode(try m.stats(device)))
    }
}
