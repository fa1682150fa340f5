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

/// The API path of a device. A name the daemon could never have made is refused here (so a
/// name like `x?force=true` or `x/queues/2` never reaches another resource), and the name is
/// percent-encoded like every other segment.
func devicePath(_ name: String) throws -> String {
    guard DeviceName.isValid(name) else {
        throw ValidationError("'\(name)' is not a device name (1-15 of A-Z a-z 0-9 _ . -, starting with a letter)")
    }
    return "/v1/devices/" + APIClient.segment(name)
}
