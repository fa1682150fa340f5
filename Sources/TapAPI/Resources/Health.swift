import MQTVersion
/// `/v1/health`: answers as long as the daemon serves requests.
enum HealthResource {
    static func get() -> HTTPResponse {
        .json(200, ["status": "ok", "version": .string(Version.current)])
    }
}
