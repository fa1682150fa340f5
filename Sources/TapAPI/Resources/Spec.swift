/// `/openapi.yaml`: the contract, as built into the binary (`OpenAPISpec.yaml`, generated
/// from the repository's `openapi.yaml`; a test keeps the two identical).
enum SpecResource {
    static func get() -> HTTPResponse {
        .text(200, OpenAPISpec.yaml, contentType: "application/yaml")
    }
}
