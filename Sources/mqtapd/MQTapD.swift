import ArgumentParser
import Logging
import TapAPI
import TapCore
import Synchronization
import TunKit

/// The daemon: flags, signals, wiring. Everything else lives in the libraries.
@main
struct MQTapD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mqtapd",
        abstract: "Owns multiqueue TUN/TAP devices and serves them over an HTTP/JSON API.",
        version: Version.current)

    @Option(name: .customLong("listen"),
            help: ArgumentHelp("Where to serve the API: unix:PATH or tcp:HOST:PORT (loopback only). Repeatable.",
                               valueName: "address"))
    var listen: [String] = []

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

    func validate() throws {
        for a in listen {
            do { _ = try ListenAddress(parsing: a) } catch { throw ValidationError(error.description) }
        }
        let addresses = listen.compactMap { try? ListenAddress(parsing: $0) }
        if Set(addresses.map(\.description)).count != addresses.count {
            throw ValidationError("the same --listen address is given twice")
        }
        if let w = workers, !(1...1024).contains(w) { throw ValidationError("--workers must be between 1 and 1024") }
        if let m = maxQueues, !(1...256).contains(m) { throw ValidationError("--max-queues must be between 1 and 256") }
        guard (1024...(16 << 20)).contains(maxBody) else { throw ValidationError("--max-body must be between 1024 and 16777216") }
        guard LineLogHandler.Format(rawValue: logFormat) != nil else { throw ValidationError("--log-format must be logfmt or json") }
    }

    func run() throws {
        let format = LineLogHandler.Format(rawValue: logFormat)!
        let log = EventLog(logger: Logger(label: "mqtapd", factory: { _ in LineLogHandler(format: format) }))
        // Before any thread starts, so that only the main thread ever receives them.
        Signals.block([Signals.terminate, Signals.interrupt])

        // Every queue is an fd: use all the fds the hard limit allows.
        let limit = ProcessResources.fileLimit()
        if limit.soft < limit.hard { try? ProcessResources.setFileLimit(soft: limit.hard) }

        // Socket activation: systemd passes listening sockets (LISTEN_FDS); without --listen
        // they are all the daemon serves.
        let inherited = Systemd.listenFDs()
        let addresses = listen.isEmpty ? (inherited.isEmpty ? [ListenAddress.defaultUnix] : [])
            : listen.map { try! ListenAddress(parsing: $0) }

        // One instance per state directory and per socket: the locks die with the process,
        // so a crash never leaves them held, and a socket file left by a crash is reclaimed.
        var locks: [FileLock] = []
        func lock(_ path: String, _ what: String) {
            do {
                locks.append(try FileLock(path: path))
            } catch {
                let why = error.errno == .wouldBlock ? "another mqtapd instance holds \(path)" : "\(error)"
                log.fail("cannot lock the \(what)", ["path": path, "error": why])
            }
        }
        do {
            try makeDirectories(stateDir)
        } catch {
            log.fail("cannot create the state directory", ["path": stateDir, "error": "\(error)"])
        }
        lock(stateDir + "/lock", "state directory")
        for case .unix(let path) in addresses {
            if let slash = path.lastIndex(of: "/"), slash != path.startIndex { try? makeDirectories(String(path[..<slash])) }
            lock(path + ".lock", "API socket \(path)")
        }

        // The desired state: an unusable file is set aside (never overwritten) and reported.
        let stateFile = StateFile(directory: stateDir)
        var desired: DesiredState?
        do {
            desired = try stateFile.load()
        } catch .corrupt(let why) {
            let aside = (try? stateFile.setAside(stamp: Clock.timestamp())) ?? "(could not be moved)"
            log.error("the state file is corrupt; it was set aside and the daemon starts empty",
                      ["path": stateFile.path, "kept_as": aside, "error": why])
        } catch .unreadable(let e) {
            log.fail("cannot read the state file", ["path": stateFile.path, "error": "\(e)"])
        }

        let manager: DeviceManager
        do {
            manager = try DeviceManager(workers: workers ?? ProcessResources.onlineCPUs(),
                                        maxQueues: maxQueues ?? desired?.maxQueues ?? 256,
                                        stateFile: stateFile, logger: log.logger)
        } catch {
            log.fail("cannot start the device manager", ["error": "\(error)"])
        }
        if let desired {
            for problem in manager.restore(desired) { log.error("device not restored", ["detail": problem]) }
            if let m = maxQueues, m != desired.maxQueues {
                do {
                    _ = try manager.setLimit(maxQueues: m)
                } catch {
                    log.error("--max-queues not applied; the state file's limit stays", ["error": error.description])
                }
            }
        }

        // Sockets first, all of them: a bad address stops the start before anything serves.
        var sockets: [(ListenAddress, Int32)] = []
        for fd in inherited {
            sockets.append((.unix(path: Systemd.unixPath(of: fd) ?? "inherited-fd-\(fd)"), fd))
        }
        let ownSocketsFrom = sockets.count
        for a in addresses {
            do {
                switch a {
                case .unix(let path):
                    sockets.append((a, try ListenSocket.unix(path: path, mode: 0o660)))
                case .tcp(let host, let port):
                    let s = try ListenSocket.tcp(host: host, port: port)
                    sockets.append((.tcp(host: host, port: s.port), s.fd))
                }
            } catch {
                for (_, fd) in sockets { closeFD(fd) }
                manager.shutdown()
                let why = error.errno == .addressInUse ? "another mqtapd instance is serving it" : "\(error)"
                log.fail("cannot listen on \(a)", ["address": a.description, "error": why])
            }
        }

        let router = Router(manager: manager)
        var limits = HTTPServer.Limits()
        limits.bodyBytes = maxBody
        let requestIDs = Atomic<UInt64>(0)
        let handler: HTTPServer.Handler = { request in
            let start = Clock.monotonicNanoseconds()
            let id = requestIDs.add(1, ordering: .relaxed).newValue
            let response = router.handle(request)
            let micros = (Clock.monotonicNanoseconds() - start) / 1000
            var fields: Logger.Metadata = [
                "request_id": "\(id)", "method": "\(request.method)", "path": "\(request.path)",
                "status": "\(response.status)", "us": "\(micros)",
            ]
            switch Route(path: request.path) {
            case .device(let d)?, .queues(let d)?, .stats(let d)?:
                fields["device"] = "\(d)"
            case .queue(let d, let q)?:
                fields["device"] = "\(d)"
                fields["queue"] = "\(q)"
            default:
                break
            }
            if let e = response.errorInfo {
                fields["code"] = "\(e.code)"
                if let errno = e.errno { fields["errno"] = "\(errno)" }
            }
            log.logger.log(level: response.status >= 500 ? .error : .info, "request", metadata: fields)
            return response
        }
        var servers: [HTTPServer] = []
        for (address, fd) in sockets {
            do {
                servers.append(try HTTPServer(listenFD: fd, limits: limits, handler: handler,
                                              tooLarge: { APIError.payloadTooLarge(limit: $0).response }))
                log.info("listening", ["address": address.description])
                // The readiness line: tools wait for it.
                writeStderrLine("mqtapd: listening on \(address)")
            } catch {
                servers.forEach { $0.stop() }
                for (_, fd) in sockets { closeFD(fd) }
                manager.shutdown()
                log.fail("cannot serve", ["address": address.description])
            }
        }
        log.info("ready", ["workers": String(manager.workerCount), "max_queues": String(manager.limits().maxQueues)])
        // Type=notify: ready only now, with the state restored and every socket served.
        Systemd.notify("READY=1\nSTATUS=serving")

        let signal = Signals.wait([Signals.terminate, Signals.interrupt])
        Systemd.notify("STOPPING=1")
        log.info("stopping", ["signal": signal == Signals.terminate ? "SIGTERM" : "SIGINT"])
        // Stop accepting and finish in-flight requests, then the devices, then the sockets.
        servers.forEach { $0.stop() }
        for (_, fd) in sockets { closeFD(fd) }
        manager.shutdown()
        // Socket files systemd made are systemd's to remove.
        for case (.unix(let path), _) in sockets[ownSocketsFrom...] { removeFile(path) }
        locks.forEach { $0.release() }
        log.info("stopped")
    }
}

/// The executable's log calls: string fields, a helper that exits.
struct EventLog: Sendable {
    let logger: Logger

    func info(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) {
        logger.info("\(message)", metadata: Self.metadata(fields))
    }

    func error(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) {
        logger.error("\(message)", metadata: Self.metadata(fields))
    }

    func fail(_ message: String, _ fields: KeyValuePairs<String, String> = [:]) -> Never {
        logger.critical("\(message)", metadata: Self.metadata(fields))
        MQTapD.exit(withError: ExitCode.failure)
    }

    private static func metadata(_ fields: KeyValuePairs<String, String>) -> Logger.Metadata {
        var m: Logger.Metadata = [:]
        for (k, v) in fields { m[k] = "\(v)" }
        return m
    }
}
