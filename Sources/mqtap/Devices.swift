import ArgumentParser
import TapJSON
import TunKit

// MARK: - device

struct Device: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create, list, show, change and delete devices.",
        subcommands: [List.self, Show.self, Create.self, Set.self, Delete.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Every device, one line each.")
        @OptionGroup var connection: Connection
        func run() throws {
            let r = try connection.call("GET", "/v1/devices")
            connection.show(r) { Table.devices($0["devices"]?.array ?? []) }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One device with its queues.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var name: String
        func run() throws {
            let d = try connection.call("GET", try devicePath(name))
            connection.show(d) { Table.device($0) }
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a multiqueue device with its queues.")
        @OptionGroup var connection: Connection
        @Argument(help: "The interface name (1-15 of A-Z a-z 0-9 _ . -, starting with a letter).") var name: String
        @Option(help: "tap or tun (default: tap).") var type: String?
        @Option(help: ArgumentHelp("Queues to open, 1 to 256 (default: 1).", valueName: "n")) var queues: Int?
        @Option(help: ArgumentHelp("The device's own queue limit (default: follow the global limit).", valueName: "n"))
        var maxQueues: Int?
        @Flag(help: "Outlive the daemon (TUNSETPERSIST) (default: off).") var persist = false
        @Flag(help: "A virtio-net header before every frame (IFF_VNET_HDR) (default: off).") var vnetHdr = false
        @Option(help: ArgumentHelp("68 to 65521 (default: the kernel's, 1500).", valueName: "bytes")) var mtu: Int?
        @Option(help: ArgumentHelp("TAP only, e.g. 02:00:00:00:00:01 (default: a random one).", valueName: "address"))
        var mac: String?
        @Flag(help: "The link state (default: --up).") var link: LinkState?
        @Option(help: "sink, echo, forward, or external (the daemon reads nothing: for consumers that attach by name, like libvirt's managed='no') (default: sink).")
        var mode: String?
        @Option(help: ArgumentHelp("With --mode forward: the device frames go to.", valueName: "device"))
        var peer: String?
        @Flag(help: "GSO and checksum offloads (TUNSETOFFLOAD); needs --vnet-hdr.") var offload = false
        @Option(help: ArgumentHelp("Only this user (id or name) may attach queues besides root (TUNSETOWNER).",
                                   valueName: "user"))
        var owner: String?
        @Option(help: ArgumentHelp("Only this group's members (id or name) may attach queues besides root (TUNSETGROUP).",
                                   valueName: "group"))
        var group: String?
        @Option(help: ArgumentHelp("Create it in this network namespace: a path (/run/netns/NAME, /proc/PID/ns/net) or a name under /run/netns.",
                                   valueName: "netns"))
        var netns: String?
        @Option(help: ArgumentHelp("Its interface name in the kernel when not the API name (default: the name).", valueName: "name"))
        var ifname: String?
        @Flag(help: "A one-queue device without IFF_MULTI_QUEUE, for single-queue consumers (only with one queue).")
        var singleQueue = false
        @Option(help: ArgumentHelp("A label KEY=VALUE kept with the device (repeat for more).", valueName: "key=value"))
        var label: [String] = []

        func validate() throws {
            for l in label where !l.contains("=") { throw ValidationError("--label must be KEY=VALUE, not \(l)") }
        }

        func run() throws {
            var body: JSONObject = ["name": .string(name)]
            if let netns { body["netns"] = .string(netns) }
            if let ifname { body["ifname"] = .string(ifname) }
            if singleQueue { body["multi_queue"] = false }
            if !label.isEmpty {
                body["labels"] = .object(JSONObject(label.map { l in
                    let kv = l.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                    return (key: String(kv[0]), value: JSON.string(kv.count > 1 ? String(kv[1]) : ""))
                }))
            }
            // A number is an id; a name is looked up here (the daemon takes ids).
            func id(_ text: String, _ flag: String, _ what: String, _ lookUp: (String) -> UInt32?) throws -> JSON {
                guard let id = UInt32(text) ?? lookUp(text) else { throw ValidationError("\(flag): no \(what) is called \(text)") }
                return JSON(Int(id))
            }
            if let owner { body["owner"] = try id(owner, "--owner", "user", Files.userID) }
            if let group { body["group"] = try id(group, "--group", "group", Files.groupID) }
            if let peer { body["peer"] = .string(peer) }
            if offload { body["offload"] = true }
            if let type { body["type"] = .string(type) }
            if let queues { body["queues"] = JSON(queues) }
            if let maxQueues { body["max_queues"] = JSON(maxQueues) }
            if persist { body["persist"] = true }
            if vnetHdr { body["vnet_hdr"] = true }
            if let mtu { body["mtu"] = JSON(mtu) }
            if let mac { body["mac"] = .string(mac) }
            if let link { body["up"] = .bool(link == .up) }
            if let mode { body["mode"] = .string(mode) }
            let d = try connection.call("POST", "/v1/devices", .object(body))
            connection.show(d) { Table.device($0) }
        }
    }

    struct Set: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change max-queues, link state, MTU, mode, the queue count or the attached count.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var name: String
        @Option(help: ArgumentHelp("The device's own queue limit.", valueName: "n")) var maxQueues: Int?
        @Flag(help: "Bring the link up or down (default: as it is).") var link: LinkState?
        @Option(help: ArgumentHelp("68 to 65521.", valueName: "bytes")) var mtu: Int?
        @Option(help: "sink, echo, forward or external.") var mode: String?
        @Option(help: ArgumentHelp("With --mode forward: the device frames go to.", valueName: "device"))
        var peer: String?
        @Option(help: ArgumentHelp("The queue count to have: adds (smallest free ids) or removes (highest ids not leased).",
                                   valueName: "n"))
        var queues: Int?
        @Option(help: ArgumentHelp("How many queues to have attached: the lowest ids; the rest are detached.",
                                   valueName: "k"))
        var enabledQueues: Int?

        func run() throws {
            var body: JSONObject = [:]
            if let maxQueues { body["max_queues"] = JSON(maxQueues) }
            if let queues { body["queues"] = JSON(queues) }
            if let enabledQueues { body["enabled_queues"] = JSON(enabledQueues) }
            if let peer { body["peer"] = .string(peer) }
            if let link { body["up"] = .bool(link == .up) }
            if let mtu { body["mtu"] = JSON(mtu) }
            if let mode { body["mode"] = .string(mode) }
            let d = try connection.call("PATCH", try devicePath(name), .object(body))
            connection.show(d) { Table.device($0) }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a device (persistent or not).")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var name: String
        @Flag(help: "Also a device with leases: revoke them and delete the link.") var force = false
        func run() throws {
            _ = try connection.call("DELETE", try devicePath(name) + (force ? "?force=true" : ""))
            connection.show(nil) { _ in "" }
        }
    }
}

/// The link state, one spelling for create and set: `--up` or `--down`.
enum LinkState: String, EnumerableFlag {
    case up, down

    static func help(for value: LinkState) -> ArgumentHelp? {
        value == .up ? "Link up." : "Link down."
    }
}
