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
    /// Sent as `Authorization: Bearer TOKEN` (TCP needs it; the Unix socket ignores it).
    public let token: String?

    public init(_ endpoint: Endpoint, timeoutSeconds: Int = 30, token: String? = nil) {
        self.endpoint = endpoint
        self.timeoutSeconds = timeoutSeconds
        self.token = token
    }

    private var authorization: [String] { token.map { ["Authorization: Bearer \($0)"] } ?? [] }

    /// A request as sent: the request line, Host and User-Agent, `headers` (`Name: value`
    /// each), then for a JSON `body` its Content-Type; the Content-Length (0 without a body)
    /// unless `length` is false, then the body.
    static func message(_ method: String, _ path: String, _ headers: [String], body: JSON?, length: Bool = true) -> [UInt8] {
        let payload = body?.serialized() ?? []
        var head = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nUser-Agent: mqtap\r\n"
        for h in headers { head += h + "\r\n" }
        if body != nil { head += "Content-Type: application/json\r\n" }
        if length { head += "Content-Length: \(payload.count)\r\n" }
        return Array((head + "\r\n").utf8) + payload
    }

    public func request(_ method: String, _ path: String, body: JSON? = nil) throws(ConnectionError) -> Response {
        let message = Self.message(method, path, ["Connection: close"] + authorization, body: body)
        let raw: [UInt8]
        do {
            let socket: ClientSocket
            switch endpoint {
            case .unix(let path): socket = try .unix(path, timeoutSeconds: timeoutSeconds)
            case .tcp(let host, let port): socket = try .tcp(host: host, port: port, timeoutSeconds: timeoutSeconds)
            }
            try socket.sendAll(message)
            raw = try socket.readAll()
        } catch {
            throw ConnectionError(description: "cannot reach mqtapd at \(endpoint): \(error)")
        }
        return try Self.parse(raw)
    }

    /// A lease taken: its connection (the lease lasts while it is open, in this process or
    /// any that inherits it), the daemon's line, and one fd per queue in the line's order.
    public struct Lease {
        public let socket: ClientSocket
        public let line: JSON
        public let fds: [Int32]
    }

    /// Takes a lease on `device` (`POST /v1/devices/{device}/leases` upgraded to
    /// `mqtapd-lease/1`): the 101, then one JSON line that carries the queue fds. A refusal
    /// comes back as the API's response. Every read is a recvmsg: a plain read of the line
    /// would make the kernel drop the fds that travel with it.
    public enum LeaseOutcome {
        case granted(Lease)
        /// The API's refusal (an ordinary error response).
        case refused(Response)
    }

    /// One path segment, percent-encoded (RFC 3986: all but unreserved characters), so what
    /// a caller passes as a name never adds a query, a fragment or a path of its own.
    public static func segment(_ text: String) -> String {
        var out = ""
        for b in text.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(b))
            default:
                let hex = String(b, radix: 16, uppercase: true)
                out += "%" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return out
    }

    public func lease(_ device: String, body: JSON?) throws(ConnectionError) -> LeaseOutcome {
        guard case .unix(let path) = endpoint else {
            throw ConnectionError(description: "a lease needs the daemon's Unix socket (fds cannot cross TCP)")
        }
        let message = Self.message("POST", "/v1/devices/\(Self.segment(device))/leases",
                                   ["Connection: Upgrade", "Upgrade: mqtapd-lease/1"], body: body)
        do {
            let socket = try ClientSocket.unix(path, timeoutSeconds: timeoutSeconds)
            try socket.sendAll(message)
            var raw: [UInt8] = []
            var fds: [Int32] = []
            var headEnd: Int?
            while true {
                let (bytes, got) = try UnixSocket.receive(socket.fd)
                fds += got
                if bytes.isEmpty { break }
                raw += bytes
                if headEnd == nil, let end = raw.firstRange(of: [13, 10, 13, 10]) { headEnd = end.upperBound }
                guard let h = headEnd else { continue }
                if !raw[..<h].starts(with: Array("HTTP/1.1 101".utf8)) {
                    // A refusal: an ordinary response, complete once its Content-Length has come
                    // (the daemon keeps the connection open for another request).
                    if let length = Self.contentLength(raw[..<h]), raw.count - h >= length { break }
                    continue
                }
                if let nl = raw[h...].firstIndex(of: 10) {
                    guard let line = try? JSON.parse(Array(raw[h..<nl])) else {
                        fds.forEach(closeFD)
                        throw ConnectionError(description: "mqtapd sent a lease line that is not JSON")
                    }
                    return .granted(Lease(socket: socket, line: line, fds: fds))
                }
            }
            fds.forEach(closeFD)
            return .refused(try Self.parse(raw))
        } catch let e as ConnectionError {
            throw e
        } catch {
            throw ConnectionError(description: "cannot reach mqtapd at \(endpoint): \(error)")
        }
    }

    /// A streamed GET (`/v1/events`): `line` gets each line of the body as it arrives (blank
    /// keep-alive lines included) and returns false to stop. A refusal comes back as the
    /// API's response; nil when the stream ended.
    public func follow(_ path: String, line: (String) -> Bool) throws(ConnectionError) -> Response? {
        let message = Self.message("GET", path, authorization, body: nil, length: false)
        do {
            let socket: ClientSocket
            // The stream is idle for up to 15 s between keep-alive lines.
            switch endpoint {
            case .unix(let p): socket = try .unix(p, timeoutSeconds: max(timeoutSeconds, 60))
            case .tcp(let host, let port): socket = try .tcp(host: host, port: port, timeoutSeconds: max(timeoutSeconds, 60))
            }
            try socket.sendAll(message)
            var raw: [UInt8] = []
            var headEnd: Int?
            while headEnd == nil {
                let got = try socket.receive()
                if got.isEmpty { throw ConnectionError(description: "mqtapd closed the connection without a response") }
                raw += got
                headEnd = raw.firstRange(of: [13, 10, 13, 10])?.upperBound
            }
            let h = headEnd!
            guard raw[..<h].starts(with: Array("HTTP/1.1 200".utf8)) else {
                while Self.contentLength(raw[..<h]).map({ raw.count - h < $0 }) ?? false {
                    let got = try socket.receive()
                    if got.isEmpty { break }
                    raw += got
                }
                return try Self.parse(raw)
            }
            if let length = Self.contentLength(raw[..<h]) {
                // Not streamed (follow=false): the whole body, then its lines.
                while raw.count - h < length {
                    let got = try socket.receive()
                    if got.isEmpty { break }
                    raw += got
                }
                for l in raw[h...].prefix(length).split(separator: 10, omittingEmptySubsequences: false).dropLast() {
                    if !line(String(decoding: l, as: UTF8.self)) { break }
                }
                return nil
            }
            // Chunked: size line, data, CRLF; lines are cut from the data as they complete.
            var buffer = Array(raw[h...])
            var text: [UInt8] = []
            while true {
                // Wait for the size line, then (but for the last chunk) the data and its CRLF.
                guard let chunk = try Self.chunk(in: buffer, at: 0), chunk.data.isEmpty || buffer.count >= chunk.next else {
                    let got = try socket.receive()
                    if got.isEmpty { return nil }
                    buffer += got
                    continue
                }
                if chunk.data.isEmpty { return nil }
                text += buffer[chunk.data]
                buffer.removeFirst(chunk.next)
                while let nl = text.firstIndex(of: 10) {
                    let l = String(decoding: text[..<nl], as: UTF8.self)
                    text.removeFirst(nl + 1)
                    if !line(l) { return nil }
                }
            }
        } catch let e as ConnectionError {
            throw e
        } catch {
            throw ConnectionError(description: "lost mqtapd at \(endpoint): \(error)")
        }
    }

    /// The Content-Length of a response head, if it has one.
    static func contentLength(_ head: ArraySlice<UInt8>) -> Int? {
        let text = String(decoding: head, as: UTF8.self)
        for line in text.split(separator: "\r\n") where line.lowercased().hasPrefix("content-length:") {
            return Int(line.dropFirst("content-length:".count).trimmingWhitespace)
        }
        return nil
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

    /// A whole chunked body's data; it stops at the last chunk, at a size that is not hex,
    /// or where the bytes end (a cut chunk gives what came of it).
    static func dechunk(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        var i = 0
        while i < data.count, let chunk = try? Self.chunk(in: data, at: i), !chunk.data.isEmpty {
            out += data[chunk.data.lowerBound..<min(chunk.data.upperBound, data.count)]
            i = chunk.next
        }
        return out
    }

    /// The chunk of a chunked body whose size line starts at `i`: where its data lies (empty
    /// for the last chunk, size 0) and where the next size line starts, after the data's
    /// CRLF; the data need not have come yet. Nil while the size line is incomplete.
    static func chunk(in data: [UInt8], at i: Int) throws(ConnectionError) -> (data: Range<Int>, next: Int)? {
        guard let lineEnd = data[i...].firstRange(of: [13, 10]) else { return nil }
        // Chunk extensions (`;name=value`) are ignored.
        let sizeText = String(decoding: data[i..<lineEnd.lowerBound], as: UTF8.self).split(separator: ";").first ?? ""
        guard let size = Int(sizeText.trimmingWhitespace, radix: 16), size >= 0 else {
            throw ConnectionError(description: "mqtapd sent a chunk size that is not hex")
        }
        let start = lineEnd.upperBound
        return (start..<(start + size), start + size + 2)
    }
}

/// The daemon's rule for an interface name, for clients that check before they ask: 1–15 of
/// `[A-Za-z0-9_.-]`, starting with a letter (the kernel would cut a longer one and expand `%d`).
public enum DeviceName {
    public static func isValid(_ name: String) -> Bool {
        let b = Array(name.utf8)
        let letter = { (c: UInt8) in (c >= 65 && c <= 90) || (c >= 97 && c <= 122) }
        return (1...15).contains(b.count) && letter(b[0])
            && b.allSatisfy { letter($0) || ($0 >= 48 && $0 <= 57) || $0 == 95 || $0 == 46 || $0 == 45 }
    }
}
