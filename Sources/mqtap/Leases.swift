import ArgumentParser
import TapClient
import TapJSON
import TunKit

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
