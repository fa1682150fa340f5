import TapClient
import TapJSON
import TunKit

/// A CNI error: printed on stdout as the spec's error object, with a non-zero exit.
struct CNIError: Error {
    let code: Int
    let msg: String
    var details = ""

    /// Well-known codes of the CNI spec 1.0.0 (0–99 are the spec's).
    static let incompatibleVersion = 1
    static let containerUnknown = 3
    static let invalidEnvironment = 4
    static let ioFailure = 5
    static let decodeFailure = 6
    static let invalidConfig = 7
    static let tryAgainLater = 11
    /// The daemon refused or failed (plugin-specific, 100 and up).
    static let daemonRefused = 100
    /// 1.1 STATUS: the plugin cannot add containers now.
    static let notAvailable = 50

    func json(version: String) -> JSON {
        var o: JSONObject = ["cniVersion": .string(version), "code": JSON(code), "msg": .string(msg)]
        if !details.isEmpty { o["details"] = .string(details) }
        return .object(o)
    }
}

/// The spec versions this plugin speaks: results are in 1.0.0's shape, which 1.1.0 keeps.
let supportedVersions = ["1.0.0", "1.1.0"]

/// What the runtime asks, from the environment (CNI_*) and stdin (the network config).
struct Invocation {
    let command: String
    let containerID: String
    let netns: String
    let ifname: String
    let path: [String]
    let environment: [String]
    let stdin: [UInt8]
    let config: Config

    struct Config {
        let cniVersion: String
        let name: String
        let socket: String
        let queues: Int
        let mode: String
        let owner: Int?
        let group: Int?
        let mtu: Int?
        let mac: String?
        let vnetHdr: Bool
        let multiQueue: Bool
        let ipamType: String?
        let dns: JSON?
        let prevResult: JSON?
    }

    static func from(environment env: [String: String], all: [String], stdin: [UInt8]) throws(CNIError) -> Invocation {
        let command = env["CNI_COMMAND"] ?? ""
        guard !command.isEmpty else { throw CNIError(code: CNIError.invalidEnvironment, msg: "required env variables [CNI_COMMAND] missing") }
        let json: JSON
        do {
            json = try JSON.parse(stdin)
        } catch {
            throw CNIError(code: CNIError.decodeFailure, msg: "the network config is not JSON", details: "\(error)")
        }
        let config = try Config.from(json)
        var missing: [String] = []
        let needs: [String: [String]] = ["ADD": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
                                         "DEL": ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
                                         "CHECK": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
                                         "GC": ["CNI_PATH"], "STATUS": []]
        guard let required = needs[command] else {
            throw CNIError(code: CNIError.invalidEnvironment, msg: "unknown CNI_COMMAND \(command)")
        }
        for name in required where (env[name] ?? "").isEmpty { missing.append(name) }
        guard missing.isEmpty else {
            throw CNIError(code: CNIError.invalidEnvironment, msg: "required env variables [\(missing.joined(separator: ","))] missing")
        }
        let ifname = env["CNI_IFNAME"] ?? ""
        if !ifname.isEmpty { try checkIfname(ifname) }
        let id = env["CNI_CONTAINERID"] ?? ""
        if !id.isEmpty, !id.utf8.allSatisfy({ isAlnum($0) || $0 == 95 || $0 == 46 || $0 == 45 }) || !isAlnum(id.utf8.first!) {
            throw CNIError(code: CNIError.invalidEnvironment, msg: "CNI_CONTAINERID \(id) is not a container id")
        }
        return Invocation(command: command, containerID: id, netns: env["CNI_NETNS"] ?? "", ifname: ifname,
                          path: (env["CNI_PATH"] ?? "").split(separator: ":").map(String.init),
                          environment: all, stdin: stdin, config: config)
    }

    /// A kernel interface name, as the daemon takes it (1–15 of A-Z a-z 0-9 _ . -).
    static func checkIfname(_ name: String) throws(CNIError) {
        guard DeviceName.isValid(name) else {
            throw CNIError(code: CNIError.invalidEnvironment, msg: "CNI_IFNAME \(name) is not an interface name mqtapd makes",
                           details: "1-15 of A-Z a-z 0-9 _ . -, starting with a letter")
        }
    }

    /// The device's name in the daemon's API: unique per (container, interface), 15
    /// characters, stable, so DEL and CHECK find what ADD made.
    var deviceName: String {
        var h: UInt64 = 0xcbf29ce484222325
        for b in (containerID + "/" + ifname).utf8 {
            h ^= UInt64(b)
            h = h &* 0x100000001b3
        }
        let hex = String(h, radix: 16)
        return "c" + String((String(repeating: "0", count: 16 - hex.count) + hex).prefix(14))
    }
}

private func isAlnum(_ b: UInt8) -> Bool { (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122) }

extension Invocation.Config {
    static func from(_ j: JSON) throws(CNIError) -> Invocation.Config {
        func invalid(_ what: String) -> CNIError { CNIError(code: CNIError.invalidConfig, msg: "Invalid Configuration", details: what) }
        guard case .object = j else { throw invalid("the network config must be a JSON object") }
        guard let version = j["cniVersion"]?.string else { throw invalid("cniVersion is missing") }
        guard let name = j["name"]?.string, !name.isEmpty else { throw invalid("name is missing") }
        func int(_ key: String, _ range: ClosedRange<Int>) throws(CNIError) -> Int? {
            guard let v = j[key] else { return nil }
            guard let n = v.int, range.contains(n) else { throw invalid("\(key) must be an integer from \(range.lowerBound) to \(range.upperBound)") }
            return n
        }
        func bool(_ key: String) throws(CNIError) -> Bool? {
            guard let v = j[key] else { return nil }
            switch v {
            case .bool(let b): return b
            default: throw invalid("\(key) must be true or false")
            }
        }
        func string(_ key: String) throws(CNIError) -> String? {
            guard let v = j[key] else { return nil }
            guard let s = v.string else { throw invalid("\(key) must be a string") }
            return s
        }
        let mode = try string("mode") ?? "external"
        guard ["external", "sink", "echo"].contains(mode) else { throw invalid("mode must be external, sink or echo") }
        let queues = try int("queues", 1...256) ?? 1
        let multiQueue = try bool("multi_queue") ?? true
        if !multiQueue && queues != 1 { throw invalid("multi_queue false needs queues 1") }
        var ipamType: String?
        if let ipam = j["ipam"] {
            guard case .object = ipam else { throw invalid("ipam must be an object") }
            guard let t = ipam["type"]?.string, !t.isEmpty, !t.contains("/") else { throw invalid("ipam.type must name a plugin") }
            ipamType = t
        }
        // A MAC from the runtime (capability "mac") wins over the config's.
        let configMAC = try string("mac")
        let mac = j["runtimeConfig"]?["mac"]?.string ?? configMAC
        return Invocation.Config(cniVersion: version, name: name, socket: try string("socket") ?? "/run/mqtapd/api.sock",
                                 queues: queues, mode: mode, owner: try int("owner", 0...4294967294),
                                 group: try int("group", 0...4294967294), mtu: try int("mtu", 68...65521), mac: mac,
                                 vnetHdr: try bool("vnet_hdr") ?? false, multiQueue: multiQueue, ipamType: ipamType,
                                 dns: j["dns"], prevResult: j["prevResult"])
    }
}
