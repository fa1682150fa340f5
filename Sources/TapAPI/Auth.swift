import TapJSON
import TunKit

/// Who may call over TCP: every TCP request carries `Authorization: Bearer TOKEN`. The Unix
/// socket needs none (its file mode and group decide who connects).
public struct BearerToken: Sendable {
    private let token: [UInt8]

    /// The token is the file's content without surrounding whitespace; nil if that is empty.
    public init?(_ text: String) {
        let t = text.trimmingWhitespace
        guard !t.isEmpty else { return nil }
        token = Array(t.utf8)
    }

    /// Whether `header` is `Bearer TOKEN` with this token. Compared in constant time (the
    /// time does not depend on where the first wrong byte is).
    public func accepts(_ header: String?) -> Bool {
        guard let header else { return false }
        let bytes = Array(header.utf8)
        let prefix = Array("Bearer ".utf8)
        guard bytes.count >= prefix.count else { return false }
        var scheme: UInt8 = 0
        for i in 0..<prefix.count {
            // The scheme is case-insensitive (RFC 7235): compare lower-cased ASCII.
            let b = bytes[i] | (bytes[i] >= 65 && bytes[i] <= 90 ? 0x20 : 0)
            let p = prefix[i] | (prefix[i] >= 65 && prefix[i] <= 90 ? 0x20 : 0)
            scheme |= b ^ p
        }
        let given = bytes[prefix.count...]
        var diff = UInt8(given.count == token.count ? 0 : 1) | scheme
        // Always as many steps as the token has, whatever was given.
        for i in 0..<token.count {
            let g = i < given.count ? given[given.startIndex + i] : 0
            diff |= g ^ token[i]
        }
        return diff == 0
    }
}

/// The one rule of who may call: anyone who can connect to the Unix socket; over TCP, only
/// with `token` (and never if the daemon has none).
func mayCall(_ transport: HTTPRequest.Transport, authorization: String?, token: BearerToken?) -> Bool {
    guard case .tcp = transport else { return true }
    return token?.accepts(authorization) == true
}
