import Logging
import TapJSON
import TunKit

/// One line per event on stderr, logfmt (`ts=… level=info msg="…" device=tap0`) or JSON
/// (`{"ts":…,"level":…,"msg":…,"device":…}`), written with a single write(2) so lines from
/// different threads never interleave.
struct LineLogHandler: LogHandler {
    enum Format: String, CaseIterable {
        case logfmt
        case json
    }

    let format: Format
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata extra: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        // Every request is logged: no merge when only one side has fields, one string grown once.
        var fields = metadata
        if let extra {
            if fields.isEmpty { fields = extra } else { fields.merge(extra) { $1 } }
        }
        let ts = Clock.timestamp()
        let lvl = level == .warning ? "warn" : level.rawValue
        let sorted = fields.sorted(by: { $0.key < $1.key })
        switch format {
        case .logfmt:
            var text = ""
            text.reserveCapacity(160)
            text += "ts="
            text += ts
            text += " level="
            text += lvl
            text += " msg="
            text += Self.quote(message.description)
            for (k, v) in sorted {
                text += " "
                text += k
                text += "="
                text += Self.quote(v.description)
            }
            writeStderrLine(text)
        case .json:
            var o: JSONObject = ["ts": .string(ts), "level": .string(lvl), "msg": .string(message.description)]
            for (k, v) in sorted { o[k] = .string(v.description) }
            writeStderrLine(JSON.object(o).text)
        }
    }

    static func quote(_ s: String) -> String {
        // Bytes, not Characters: this runs for every field of every request.
        let plain = !s.isEmpty && s.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "\"") && $0 != UInt8(ascii: "=") }
        if plain { return s }
        var out = "\""
        for c in s {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out + "\""
    }
}
