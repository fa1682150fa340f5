/// `/openapi.yaml`: the contract, as built into the binary. SwiftPM embeds the repository's
/// `openapi.yaml` (Sources/TapAPI/openapi.yaml links to it), so there is one copy.
enum SpecResource {
    static let yaml = String(decoding: PackageResources.openapi_yaml, as: UTF8.self)

    static func get() -> HTTPResponse {
        .text(200, yaml, contentType: "application/yaml")
    }
}
