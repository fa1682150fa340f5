import TunKit

/// A `--listen` address: `unix:PATH` or `tcp:HOST:PORT` (IPv6 hosts in brackets).
public enum ListenAddress: Equatable, Sendable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)

    public static let defaultUnix = ListenAddress.unix(path: "/run/mqtapd/api.sock")

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case malformed(String)
        /// The API creates network interfaces (root-equivalent), and over plain TCP its bearer
        /// token can be read on the wire: it is never exposed beyond loopback.
        case notLoopback(String)

        public var description: String {
            switch self {
            case .malformed(let s):
                return "invalid --listen '\(s)': expected unix:PATH or tcp:HOST:PORT (e.g. tcp:127.0.0.1:8080)"
            case .notLoopback(let s):
                return "refusing --listen '\(s)': the API is root-equivalent and its token travels in clear over TCP, so TCP listens on loopback only (127.0.0.0/8, ::1, localhost)"
            }
        }
    }

    public init(parsing text: String) throws(ParseError) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty, path.utf8.count <= 107 else { throw .malformed(text) }
            self = .unix(path: path)
            return
        }
        guard text.hasPrefix("tcp:") else { throw .malformed(text) }
        guard let (host, port) = splitHostPort(text.dropFirst(4)) else { throw .malformed(text) }
        guard Self.isLoopback(host) else { throw .notLoopback(text) }
        self = .tcp(host: host, port: port)
    }

    static func isLoopback(_ host: String) -> Bool {
        if host == "localhost" || host == "::1" { return true }
        let octets = host.split(separator: ".", omittingEmptySubsequences: false)
        guard octets.count == 4, octets.allSatisfy({ UInt8($0) != nil }) else { return false }
        return octets[0] == "127"
    }

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .tcp(let host, let port): return host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        }
    }
}
