import MQTVersion
import ArgumentParser
import Logging
import TapAPI
import TapCore
import TunKit

/// The daemon's command line: flags and their checks. `Daemon` does the rest.
@main
struct MQTapD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mqtapd",
        abstract: "Owns multiqueue TUN/TAP devices and serves them over an HTTP/JSON API.",
        version: Version.current)

    @Option(name: .customLong("listen"),
            help: ArgumentHelp("Where to serve the API: unix:PATH or tcp:HOST:PORT (loopback only). Repeatable.",
                               valueName: "address"),
            transform: MQTapD.parseListen)
    var listen: [ListenAddress] = []

    @Option(help: ArgumentHelp("Directory for the daemon's state.", valueName: "dir"))
    var stateDir = "/var/lib/mqtapd"

    @Option(help: ArgumentHelp("Worker threads (default: online CPUs).", valueName: "n"))
    var workers: Int?

    @Option(help: ArgumentHelp("Global per-device queue limit, 1 to 256 (default: the state file's, else 256).",
                               valueName: "n"))
    var maxQueues: Int?

    @Option(help: ArgumentHelp("Largest request body in bytes.", valueName: "bytes"))
    var maxBody = 64 * 1024

    @Option(help: ArgumentHelp("Log lines as logfmt or json.", valueName: "format"))
    var logFormat = "logfmt"

    @Option(help: ArgumentHelp("Events kept for watchers that resume with ?since=N.", valueName: "n"))
    var eventRetention = 4096

    @Option(help: ArgumentHelp("Live leases at most, over all devices; each holds one connection, counted apart from the API's 256 (past it: 409 lease_limit).",
                               valueName: "n"))
    var maxLeases = 1024

    @Option(help: ArgumentHelp("Group that owns the Unix sockets (root:NAME, mode 0660): its members may call the API (default: root's).",
                               valueName: "name"))
    var socketGroup: String?

    @Option(help: ArgumentHelp("File holding the token every TCP request must carry (Authorization: Bearer TOKEN); required with --listen tcp:…, mode 600 or 640 (its group may read it: give it to a scraper's group).",
                               valueName: "path"))
    var tokenFile: String?

    /// `--listen` is parsed once, here; a bad address is a usage error naming the flag.
    static func parseListen(_ text: String) throws -> ListenAddress {
        do { return try ListenAddress(parsing: text) } catch { throw ValidationError(error.description) }
    }

    func validate() throws {
        if Set(listen.map(\.description)).count != listen.count {
            throw ValidationError("the same --listen address is given twice")
        }
        if let w = workers, !(1...1024).contains(w) { throw ValidationError("--workers must be between 1 and 1024") }
        if let m = maxQueues, !(1...256).contains(m) { throw ValidationError("--max-queues must be between 1 and 256") }
        guard (1...65536).contains(maxLeases) else { throw ValidationError("--max-leases must be between 1 and 65536") }
        guard (1...(1 << 20)).contains(eventRetention) else { throw ValidationError("--event-retention must be between 1 and 1048576") }
        guard (1024...(16 << 20)).contains(maxBody) else { throw ValidationError("--max-body must be between 1024 and 16777216") }
        guard LineLogHandler.Format(rawValue: logFormat) != nil else { throw ValidationError("--log-format must be logfmt or json") }
        if listen.contains(where: { if case .tcp = $0 { return true } else { return false } }) && tokenFile == nil {
            throw ValidationError("--listen tcp:… needs --token-file: the API creates network interfaces, so TCP requests must carry a token")
        }
    }

    func run() throws {
        let format = LineLogHandler.Format(rawValue: logFormat)!
        let log = DaemonLog(logger: Logger(label: "mqtapd", factory: { _ in LineLogHandler(format: format) }))
        let daemon = Daemon(options: .init(listen: listen, stateDir: stateDir, workers: workers, maxQueues: maxQueues,
                                           maxBody: maxBody, socketGroup: socketGroup, tokenFile: tokenFile,
                                           eventRetention: eventRetention, maxLeases: maxLeases), log: log)
        do {
            try daemon.start()
        } catch {
            log.logger.critical("\(error.message)", metadata: error.metadata)
            daemon.stop()
            throw ExitCode.failure
        }
        let signal = daemon.waitForSignal()
        log.info("stopping", ["signal": signal == Signals.terminate ? "SIGTERM" : "SIGINT"])
        daemon.stop()
        log.info("stopped")
    }
}

/// The executable's log calls: string fields.
struct DaemonLog: Sendable {
    let logger: Logger

    func info(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) {
        logger.info("\(message)", metadata: Self.metadata(fields))
    }

    func warning(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) {
        logger.warning("\(message)", metadata: Self.metadata(fields))
    }

    func error(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) {
        logger.error("\(message)", metadata: Self.metadata(fields))
    }

    static func metadata(_ fields: KeyValuePairs<String, String>) -> Logger.Metadata {
        var m: Logger.Metadata = [:]
        for (k, v) in fields { m[k] = "\(v)" }
        return m
    }
}
