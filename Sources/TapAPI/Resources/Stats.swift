import TapCore
import TapJSON
import TunKit

/// `/v1/devices/{name}/stats`: per queue, the total, and the kernel's device counters.
enum StatsResource {
    static func encode(_ s: DeviceStats) -> JSON {
        // The id, then the counters: concatenated, as the keys are known to differ.
        let queues: [JSON] = s.queues.map { q in
            .object(JSONObject([(key: "id", value: JSON(q.id))] + QueuesResource.encode(q.counters).entries))
        }
        var o: JSONObject = ["queues": .array(queues), "total": .object(QueuesResource.encode(s.total))]
        if let k = s.kernel {
            o["kernel"] = .object(JSONObject(k.sorted { $0.key < $1.key }.map { (key: $0.key, value: JSON($0.value)) }))
        } else {
            // The kernel's counters could not be read: said so, not answered as empty.
            o["kernel"] = .null
            if let e = s.kernelError { o["kernel_error"] = encode(e) }
        }
        return .object(o)
    }

    /// A kernel read that failed, as the device view and the stats say it.
    static func encode(_ e: KernelError) -> JSON {
        ["call": .string(e.call), "errno": .string(e.errno), "message": .string(e.message)]
    }

    static func get(_ m: DeviceManager, _ device: String) throws -> HTTPResponse {
        .json(200, encode(try m.stats(device)))
    }
}
