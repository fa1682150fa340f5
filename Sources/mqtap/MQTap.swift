import ArgumentParser
import MQTVersion
import TapClient
import TapJSON
import TunKit

/// Starts `mqtap` with the global options (`--socket`, `--url`, `--token-file`, `--json`)
/// accepted before the subcommand as well as after it, as docker, kubectl and virsh users
/// type them: they are moved to just after the subcommand's name.
@main
enum Entry {
    static func main() {
        MQTap.main(GlobalOptions.moved(Array(CommandLine.arguments.dropFirst()), commands: MQTap.self))
    }
}

enum GlobalOptions {
    static let valued: Set<String> = ["--socket", "--url", "--token-file"]
    static let flags: Set<String> = ["--json"]

    /// `args` with the global options given before the subcommand moved after its name (the
    /// longest run of subcommand names that starts the rest); nothing else changes.
    static func moved(_ args: [String], commands: any ParsableCommand.Type) -> [String] {
        var globals: [String] = []
        var i = 0
        while i < args.count {
            let a = args[i]
            let name = a.split(separator: "=", maxSplits: 1).first.map(String.init) ?? a
            if valued.contains(name) {
                globals.append(a)
                if !a.contains("="), i + 1 < args.count {
                    globals.append(args[i + 1])
                    i += 1
                }
            } else if flags.contains(a) {
                globals.append(a)
            } else {
                break
            }
            i += 1
        }
        guard !globals.isEmpty else { return args }
        var rest = Array(args[i...])
        // The subcommand path: each word a subcommand of the one before.
        var at = 0
        var command = commands
        while at < rest.count,
              let next = command.configuration.subcommands.first(where: { $0._commandName == rest[at] }) {
            command = next
            at += 1
        }
        rest.insert(contentsOf: globals, at: at)
        return rest
    }
}

/// `mqtap`: mqtapd's command-line client. Tables for people, `--json` for scripts; an API
/// error prints its code and message on stderr and exits 1 (3 if the daemon is unreachable).
struct MQTap: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mqtap",
        abstract: "Drive mqtapd: devices, queues, leases, limits, per-queue counters and events.",
        version: Version.current,
        subcommands: [Ping.self, Device.self, Queue.self, Lease.self, Limits.self, Stats.self, Events.self])
}

struct Connection: ParsableArguments {
    @Option(help: ArgumentHelp("mqtapd's Unix socket.", valueName: "path"))
    var socket = "/run/mqtapd/api.sock"

    @Option(help: ArgumentHelp("mqtapd over TCP instead, e.g. http://127.0.0.1:8080.", valueName: "url"))
    var url: String?

    @Option(help: ArgumentHelp("File holding the daemon's TCP token (its --token-file), for --url.", valueName: "path"))
    var tokenFile: String?

    @Flag(help: "Print the API's JSON instead of a table.")
    var json = false

    func validate() throws {
        if let url, APIClient.Endpoint(url: url) == nil {
            throw ValidationError("--url must look like http://127.0.0.1:8080")
        }
    }

    var client: APIClient {
        get throws {
            var token: String?
            if let tokenFile {
                guard let bytes = try? Files.read(tokenFile) else {
                    writeStderrLine("mqtap: cannot read --token-file \(tokenFile)")
                    throw ExitCode(64)
                }
                token = String(decoding: bytes, as: UTF8.self).trimmingWhitespace
            }
            return APIClient(url.flatMap(APIClient.Endpoint.init(url:)) ?? .unix(socket), token: token)
        }
    }

    /// Calls the API; on an error prints it and exits.
    func call(_ method: String, _ path: String, _ body: JSON? = nil) throws -> JSON? {
        let r: APIClient.Response
        let client = try self.client
        do {
            r = try client.request(method, path, body: body)
        } catch {
            writeStderrLine("mqtap: \(error)")
            throw ExitCode(3)
        }
        if let e = r.error {
            writeStderrLine("mqtap: \(e.code): \(e.message)")
            throw ExitCode(1)
        }
        return r.json
    }

    /// Prints the JSON (for --json) or the table `human` makes.
    func show(_ value: JSON?, _ human: (JSON) -> String) {
        if json {
            print(value?.text ?? "{}")
        } else if let value {
            let text = human(value)
            if !text.isEmpty { print(text) }
        }
    }
}

// MARK: - ping

struct Ping: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check that mqtapd answers (exit 0 if it does).")
    @OptionGroup var connection: Connection

    func run() throws {
        let h = try connection.call("GET", "/v1/health")
        connection.show(h) { "mqtapd \($0["version"]?.string ?? "?") ok" }
    }
}

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

// MARK: - events

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follow the daemon's events as they happen (Ctrl-C stops).",
        discussion: "Each line: time, id, type, device, then queue, by, lease and changed fields. --json prints the API's lines.")
    @OptionGroup var connection: Connection
    @Option(help: ArgumentHelp("Replay the kept events after this id first.", valueName: "id")) var since: UInt64?
    @Option(help: ArgumentHelp("Only this device's events.", valueName: "name")) var device: String?
    @Flag(help: "Print what is kept and stop instead of following.") var noFollow = false

    func run() throws {
        var query: [String] = []
        if let since { query.append("since=\(since)") }
        if let device { query.append("device=" + APIClient.segment(device)) }
        if noFollow { query.append("follow=false") }
        let path = "/v1/events" + (query.isEmpty ? "" : "?" + query.joined(separator: "&"))
        let client = try connection.client
        let json = connection.json
        let refusal: APIClient.Response?
        var readerGone = false
        do {
            refusal = try client.follow(path) { line in
                guard !line.isEmpty else { return true }  // keep-alive
                let written: Bool
                if json {
                    written = writeStdoutLine(line)
                } else if let e = try? JSON.parse(Array(line.utf8)) {
                    written = writeStdoutLine(Table.event(e))
                } else {
                    written = writeStdoutLine(line)
                }
                if !written { readerGone = true }
                return written
            }
        } catch {
            writeStderrLine("mqtap: \(error)")
            throw ExitCode(3)
        }
        if let r = refusal, let e = r.error {
            writeStderrLine("mqtap: \(e.code): \(e.message)")
            throw ExitCode(1)
        }
        // A followed stream ends only when the daemon ends it (it stopped, or cut a watcher
        // that fell behind) or nobody reads our output any more (`| head`).
        guard !noFollow, !readerGone else { return }
        // Stopping (503 shutting_down) or gone: the daemon went away.
        guard let health = try? client.request("GET", "/v1/health"), health.status == 200 else {
            writeStderrLine("mqtap: the event stream ended: mqtapd went away (stopped or restarting)")
            throw ExitCode(3)
        }
        writeStderrLine("mqtap: mqtapd ended the event stream (a watcher that falls behind is cut; resume with --since)")
        throw ExitCode(1)
    }
}

// MARK: - lease

struct Lease: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Hand a device's queues to a command (a VMM), list and revoke leases.",
        subcommands: [Take.self, List.self, Revoke.self], defaultSubcommand: Take.self)

    struct Take: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "take",
            abstract: "Take a lease, then run COMMAND with the queue fds and the lease connection inherited.",
            discussion: """
                {fds} in COMMAND's arguments becomes the fds, colon-separated (QEMU's fds= syntax). \
                The lease lasts while COMMAND (or anything it passes the connection to) keeps it open. \
                MQTAP_LEASE, MQTAP_LEASE_FD and MQTAP_QUEUE_FDS are set for COMMAND.
                Example: mqtap lease vm0 -- qemu-system-x86_64 ... -netdev tap,id=n0,fds={fds},vhost=off
                """)
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Option(help: ArgumentHelp("Queue ids to lease, e.g. 0,1 (default: every queue).", valueName: "ids"))
        var queues: String?
        @Option(help: ArgumentHelp("Who holds the lease, as the API shows it (at most 128 characters).", valueName: "text"))
        var holder: String?
        @Argument(parsing: .postTerminator, help: "The command to run, after --.") var command: [String] = []

        func validate() throws {
            guard !command.isEmpty else { throw ValidationError("give the command to run after --") }
            _ = try devicePath(device)
            if connection.url != nil {
                throw ValidationError("a lease passes fds, which cannot cross TCP: use the daemon's Unix socket (--socket), not --url")
            }
            if let queues, queues.split(separator: ",").contains(where: { Int($0) == nil }) {
                throw ValidationError("--queues must be queue ids separated by commas, e.g. 0,1")
            }
        }

        func run() throws {
            var body: JSONObject = [:]
            if let queues { body["queues"] = .array(queues.split(separator: ",").map { JSON(Int($0)!) }) }
            if let holder { body["holder"] = .string(holder) }
            let lease: APIClient.Lease
            do {
                let client = try connection.client
                switch try client.lease(device, body: .object(body)) {
                case .granted(let l): lease = l
                case .refused(let r):
                    let e = r.error ?? ("http_\(r.status)", "unexpected answer")
                    writeStderrLine("mqtap: \(e.code): \(e.message)")
                    throw ExitCode(1)
                }
            } catch let e as APIClient.ConnectionError {
                writeStderrLine("mqtap: \(e)")
                throw ExitCode(3)
            }
            let fds = lease.fds.map(String.init).joined(separator: ":")
            let id = lease.line["lease"]?.string ?? ""
            if !connection.json {
                writeStderrLine("mqtap: lease \(id) on \(device): queues \(Table.ids(lease.line["queues"])) as fds \(fds)")
            }
            // Inherited by COMMAND: the queue fds and the connection the lease lasts for.
            for fd in lease.fds + [lease.socket.fd] { try? Process.inherit(fd) }
            let argv = command.map { $0.replacingAll("{fds}", with: fds) }
            let env = ["MQTAP_LEASE=\(id)", "MQTAP_LEASE_FD=\(lease.socket.fd)", "MQTAP_QUEUE_FDS=\(fds)"]
            let error = Process.exec(argv, addingEnvironment: env)
            writeStderrLine("mqtap: cannot run \(argv[0]): \(error)")
            withExtendedLifetime(lease.socket) {}
            throw ExitCode(127)
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The leases of a device.")
        @OptionGroup var connection: Connection
        @Argument var device: String
        func run() throws {
            let r = try connection.call("GET", try devicePath(device) + "/leases")
            connection.show(r) { Table.leases($0["leases"]?.array ?? []) }
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Revoke a lease: its queues are detached and its connection closed (an orphaned lease is forgotten).")
        @OptionGroup var connection: Connection
        @Argument var device: String
        @Argument var id: String
        func run() throws {
            _ = try connection.call("DELETE", try devicePath(device) + "/leases/\(APIClient.segment(id))")
            connection.show(nil) { _ in "" }
        }
    }
}

extension String {
    func replacingAll(_ target: String, with replacement: String) -> String {
        var out = ""
        var rest = Substring(self)
        while let r = rest.firstRange(of: target) {
            out += rest[..<r.lowerBound] + replacement
            rest = rest[r.upperBound...]
        }
        return out + rest
    }
}

// MARK: - queue

struct Queue: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Add, list, enable (attach), disable (detach) and remove queues.",
        subcommands: [List.self, Add.self, Enable.self, Disable.self, Remove.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A device's queues with their counters.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        func run() throws {
            let r = try connection.call("GET", try devicePath(device) + "/queues")
            connection.show(r) { Table.queues($0["queues"]?.array ?? []) }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Add queues; each takes the smallest free id.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Option(help: ArgumentHelp("How many, 1 to 256.", valueName: "n")) var count = 1
        func run() throws {
            let r = try connection.call("POST", try devicePath(device) + "/queues", ["count": JSON(count)])
            connection.show(r) { Table.queues($0["queues"]?.array ?? []) }
        }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Attach a queue again (TUNSETQUEUE).")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Argument(help: "The queue id.") var id: Int
        func run() throws {
            let q = try connection.call("PATCH", try devicePath(device) + "/queues/\(id)", ["enabled": true])
            connection.show(q) { Table.queues([$0]) }
        }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Detach a queue; it keeps its fd, id and counters.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Argument(help: "The queue id.") var id: Int
        func run() throws {
            let q = try connection.call("PATCH", try devicePath(device) + "/queues/\(id)", ["enabled": false])
            connection.show(q) { Table.queues([$0]) }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a queue (not the last one).")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Argument(help: "The queue id.") var id: Int
        func run() throws {
            _ = try connection.call("DELETE", try devicePath(device) + "/queues/\(id)")
            connection.show(nil) { _ in "" }
        }
    }
}

// MARK: - limits

struct Limits: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show or set the global queue limit.",
                                                    subcommands: [Show.self, Set.self])

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The global limit, queues in use, open files.")
        @OptionGroup var connection: Connection
        func run() throws {
            let l = try connection.call("GET", "/v1/limits")
            connection.show(l) { Table.limits($0) }
        }
    }

    struct Set: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Set the global limit (devices without their own follow it).")
        @OptionGroup var connection: Connection
        @Argument(help: "The new global per-device queue limit, 1 to 256.") var maxQueues: Int
        func run() throws {
            let l = try connection.call("PUT", "/v1/limits", ["max_queues": JSON(maxQueues)])
            connection.show(l) { Table.limits($0) }
        }
    }
}

// MARK: - stats

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per-queue counters; --watch refreshes them with packet and byte rates.",
        discussion: """
            rx counts the frames the daemon read from a queue: what the kernel sent into the device (so the \
            total rx is the kernel's tx_packets). tx counts the frames written into a queue: what the kernel \
            received from the device. Off a terminal, --watch prints the header once, then one line per \
            queue and one for the total per sample, each starting with the sample's time (RFC 3339).
            """)
    @OptionGroup var connection: Connection
    @Argument var device: String
    @Flag(help: "Refresh every --interval seconds, with packet and byte rates.") var watch = false
    @Option(help: "Seconds between refreshes.") var interval = 1.0
    @Option(help: "Stop after this many refreshes (default: until interrupted).") var count: Int?

    func validate() throws {
        guard interval >= 0.1 else { throw ValidationError("--interval must be at least 0.1") }
    }

    func run() throws {
        var previous: (JSON, Double)?
        var n = 0
        repeat {
            let s = try connection.call("GET", try devicePath(device) + "/stats") ?? .null
            let now = Double(Clock.monotonicNanoseconds()) / 1e9
            if connection.json {
                writeStdoutLine(s.text)
            } else if watch && !isTerminal(1) {
                // In a pipe or a file, as vmstat -t and sar do: the legend and header once,
                // then one line per queue and the total per sample, each with its time,
                // written at once (nothing waits in a buffer).
                if n == 0 { writeStdoutLine(Table.statsLegend + "\n" + Table.statsLineHeader) }
                for line in Table.statsLines(s, previous: previous.map { ($0.0, now - $0.1) }, time: Clock.timestamp()) {
                    writeStdoutLine(line)
                }
            } else {
                let table = Table.stats(s, previous: previous.map { ($0.0, now - $0.1) })
                // On a terminal the table is redrawn in place.
                if watch {
                    writeStdoutLine("\u{1B}[H\u{1B}[2J" + table)
                } else {
                    writeStdoutLine(table)
                }
            }
            previous = (s, now)
            n += 1
            if watch, count.map({ n < $0 }) ?? true { Clock.sleep(interval) }
        } while watch && count.map({ n < $0 }) ?? true
    }
}

/// The API path of a device. A name the daemon could never have made is refused here (so a
/// name like `x?force=true` or `x/queues/2` never reaches another resource), and the name is
/// percent-encoded like every other segment.
func devicePath(_ name: String) throws -> String {
    guard DeviceName.isValid(name) else {
        throw ValidationError("'\(name)' is not a device name (1-15 of A-Z a-z 0-9 _ . -, starting with a letter)")
    }
    return "/v1/devices/" + APIClient.segment(name)
}
