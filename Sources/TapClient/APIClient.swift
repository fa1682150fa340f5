import TapJSON
import TunKit

/// A small HTTP/1.1 client for mqtapd's API over its Unix socket or loopback TCP: one
/// request per connection (`Connection: close`), JSON bodies. What the `mqtap` CLI uses;
/// no HTTP library needed for that much.
public struct APIClient: Sendable {
    public enum Endpoint: Sendable, Equatable, CustomStringConvertible {
        case unix(String)
        case tcp(host: String, port: Int)

        /// `http://HOST:PORT` (IPv6 in brackets), no path.
        public init?(url: String) {
            guard url.hasPrefix("http://") else { return nil }
            var rest = url.dropFirst(7)
            if rest.hasSuffix("/") { rest = rest.dropLast() }
            guard let (host, port) = splitHostPort(rest), port >= 1 else { return nil }
            self = .tcp(host: host, port: port)
        }

        public var description: String {
            switch self {
            case .unix(let path): return "unix:\(path)"
            case .tcp(let host, let port): return "http://\(host.contains(":") ? "[\(host)]" : host):\(port)"
            }
        }
    }

    public struct Response: Sendable {
        public let status: Int
        public let body: [UInt8]
        public var json: JSON? { body.isEmpty ? nil : try? JSON.parse(body) }
        /// The API's error code and message, for a status of 400 or more.
        public var error: (code: String, message: String)? {
            guard status >= 400 else { return nil }
            if case .string(let code)? = json?["error"]?["code"], case .string(let message)? = json?["error"]?["message"] {
                return (code, message)
            }
            return ("http_\(status)", String(decoding: body.prefix(200), as: UTF8.self))
        }
    }

    /// The daemon could not be reached, or answered with something that is not HTTP.
    public struct ConnectionError: Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    public let endpoint: Endpoint
    public let timeoutSeconds: Int

    public init(_ endpoint: Endpoint, timeoutSeconds: Int = 30) {
        self.endpoint = endpoint
        self.timeoutSeconds = timeoutSeconds
    }

    public func request(_ method: String, _ path: String, body: JSON? = nil) throws(ConnectionError) -> Response {
        let payload = body?.serialized() ?? []
        var head = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nUser-Agent: mqtap\r\n"
        if body != nil { head += "Content-Type: application/json\r\n" }
        head += "Content-Length: \(payload.count)\r\n\r\n"
        let raw: [UInt8]
        do {
            let socket: ClientSocket
            switch endpoint {
            case .unix(let path): socket = try .unix(path, timeoutSeconds: timeoutSeconds)
            case .tcp(let host, let port): socket = try .tcp(host: host, port: port, timeoutSeconds: timeoutSeconds)
            }
            try socket.sendAll(Array(head.utf8) + payload)
            raw = try socket.readAll()
        } catch {
            throw ConnectionError(description: "cannot reach mqtapd at \(endpoint): \(error)")
        }
        return try Self.parse(raw)
    }

    /// Parses a complete HTTP/1.1 response (Content-Length or chunked or until close).
    static func parse(_ raw: [UInt8]) throws(ConnectionError) -> Response {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let end = raw.firstRange(of: separator) else {
            throw ConnectionError(description: "mqtapd closed the connection without a complete response")
        }
        let head = String(decoding: raw[..<end.lowerBound], as: UTF8.self)
        let lines = head.split(separator: "\r\n", omittingEmptySubsequences: false)
        let statusParts = lines.first?.split(separator: " ") ?? []
        guard statusParts.count >= 2, statusParts[0].hasPrefix("HTTP/1."), let status = Int(statusParts[1]) else {
            throw ConnectionError(description: "not an HTTP response: \(lines.first ?? "")")
        }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].drop { $0 == " " }.description
        }
        var body = Array(raw[end.upperBound...])
        if let length = headers["content-length"].flatMap(Int.init) {
            body = Array(body.prefix(length))
        } else if headers["transfer-encoding"]?.lowercased() == "chunked" {
            body = dechunk(body)
        }
        return Response(status: status, body: body)
    }

    static func dechunk(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        var i = 0
        while i < data.count {
            guard let lineEnd = data[i...].firstRange(of: [13, 10]) else { break }
            let sizeText = String(decoding: data[i..<lineEnd.lowerBound], as: UTF8.self)
                .split(separator: ";").first.map { $0.filter { $0 != " " && $0 != "\t" } } ?? ""
            guard let size = Int(sizeText, radix: 16), size > 0 else { break }
            let start = lineEnd.upperBound
            out.append(contentsOf: data[start..<min(start + size, data.count)])
            i = start + size + 2
        }
        return out
    }
}
