@testable import TapClient
import TapJSON
import Testing

@Suite("the CLI's HTTP client")
struct ClientTests {
    func raw(_ s: String) -> [UInt8] { Array(s.utf8) }

    @Test("Content-Length bodies, error bodies, chunked bodies")
    func parse() throws {
        let ok = try APIClient.parse(raw("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}"))
        #expect(ok.status == 200 && ok.json?["status"] == "ok" && ok.error == nil)
        let err = try APIClient.parse(raw("HTTP/1.1 409 Conflict\r\nContent-Length: 46\r\n\r\n{\"error\":{\"code\":\"last_queue\",\"message\":\"no\"}}xxxx"))
        #expect(err.error?.code == "last_queue" && err.error?.message == "no")
        let chunked = try APIClient.parse(raw("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"))
        #expect(chunked.json?["a"] == 1)
        let empty = try APIClient.parse(raw("HTTP/1.1 204 No Content\r\n\r\n"))
        #expect(empty.status == 204 && empty.body.isEmpty && empty.json == nil)
        #expect(throws: APIClient.ConnectionError.self) { try APIClient.parse(raw("garbage")) }
        #expect(throws: APIClient.ConnectionError.self) { try APIClient.parse(raw("SSH-2.0 x\r\n\r\n")) }
    }

    @Test("--url forms")
    func urls() {
        #expect(APIClient.Endpoint(url: "http://127.0.0.1:8080") == .tcp(host: "127.0.0.1", port: 8080))
        #expect(APIClient.Endpoint(url: "http://[::1]:9/") == .tcp(host: "::1", port: 9))
        #expect(APIClient.Endpoint(url: "https://127.0.0.1:8080") == nil)
        #expect(APIClient.Endpoint(url: "http://127.0.0.1") == nil)
        #expect(APIClient.Endpoint(url: "http://127.0.0.1:0") == nil)
    }
}
