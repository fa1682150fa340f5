import TapCore
import TapJSON

/// `/v1/limits`: the global queue limit, and the headroom a client can see before it asks.
enum LimitsResource {
    static func decodePut(_ bytes: [UInt8]) throws(APIError) -> Int {
        let b = try Body(bytes, allowed: ["max_queues"])
        return try b.required("max_queues", b.int("max_queues", in: Validate.queueCountRange))
    }

    static func encode(_ l: LimitsInfo) -> JSON {
        [
            "max_queues": JSON(l.maxQueues), "kernel_max_queues": JSON(l.kernelMaxQueues),
            "devices": JSON(l.devices), "queues_in_use": JSON(l.queuesInUse),
            "open_files": JSON(l.openFiles), "open_files_limit": JSON(l.openFilesLimit),
        ]
    }

    static func get(_ m: DeviceManager) -> HTTPResponse { .json(200, encode(m.limits())) }

    static func put(_ m: DeviceManager, _ r: HTTPRequest) throws -> HTTPResponse {
        .json(200, encode(try m.setLimit(maxQueues: decodePut(r.body))))
    }
}
