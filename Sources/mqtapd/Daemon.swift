import Logging
import Synchronization
import TapAPI
import TapCore
import TunKit

/// The running daemon: its parts started in order (signals, fd limit, state directory and
/// its lock, socket locks, state file, device manager, lease watcher, listening sockets, HTTP
/// servers),
/// and stopped in reverse. A failed start stops what had started.
final class Daemon {
    struct Options {
        var listen: [ListenAddress]
        var stateDir: String
        var workers: Int?
        var maxQueues: Int?
        var maxBody: Int
        var socketGroup: String?
        var tokenFile: String?
        var eventRetention: Int
        var maxLeases = 1024
    }

    /// Why the daemon could not start: a message and its fields for the log.
    struct StartError: Error {
        let message: String
        let metadata: Logger.Metadata

        init(_ message: String, _ fields: KeyValuePairs<String, String>) {
            self.message = message
            metadata = DaemonLog.metadata(fields)
        }
    }

    enum State { case starting, serving, stopping, stopped }

    private(set) var state = State.starting
    private let options: Options
    private let log: DaemonLog
    /// What `stop` undoes, in the order the parts started.
    private var started: [(name: String, stop: () -> Void)] = []

    init(options: Options, log: DaemonLog) {
        self.options = options
        self.log = log
    }

    func start() throws(StartError) {
        precondition(state == .starting, "a daemon starts once")
        // Before any thread starts, so that only the main thread ever receives them.
        Signals.block([Signals.terminate, Signals.interrupt, Signals.hangUp])
        // Every queue is an fd: use all the fds the hard limit allows.
        let limit = ProcessResources.fileLimit()
        if limit.soft < limit.hard { try? ProcessResources.setFileLimit(soft: limit.hard) }
        // Opens the fd directory it keeps, while fds are plenty: /v1/limits counts under EMFILE.
        _ = ProcessResources.openFileCount()

        // Socket activation: systemd passes listening sockets (LISTEN_FDS); without --listen
        // they are all the daemon serves. Each becomes its owner at once.
        let inherited = Systemd.listenFDs().map { fd in (fd, Systemd.unixPath(of: fd)) }
        let listeners = Listeners()
        for (fd, path) in inherited {
            listeners.add(.unix(path: path ?? "inherited-fd-\(fd)"), socket: ListeningSocket(adopting: fd), ownsFile: false)
        }
        started.append(("inherited sockets", { listeners.close() }))
        let addresses = options.listen.isEmpty && inherited.isEmpty ? [ListenAddress.defaultUnix] : options.listen

        let token = try readToken()
        let socketGID = try resolveGroup()
        let locks = try lockInstance(addresses)
        started.append(("locks", { locks.releaseAll() }))

        let stateFile = StateFile(directory: options.stateDir)
        let desired = try loadState(stateFile)

        let manager: DeviceManager
        do {
            manager = try DeviceManager(workers: options.workers ?? ProcessResources.onlineCPUs(),
                                        maxQueues: options.maxQueues ?? desired?.maxQueues ?? 256,
                                        stateFile: stateFile, eventRetention: options.eventRetention,
                                        maxLeases: options.maxLeases, logger: log.logger)
        } catch {
            throw StartError("cannot start the device manager", ["error": "\(error)"])
        }
        started.append(("device manager", { manager.shutdown() }))
        if let desired { restore(desired, into: manager) }

        // Lease connections are watched here once upgraded (the servers close them first).
        let leaseWatcher: LeaseWatcher
        do {
            leaseWatcher = try LeaseWatcher()
        } catch {
            throw StartError("cannot start the lease watcher", ["error": "\(error)"])
        }
        started.append(("lease watcher", { leaseWatcher.stop() }))
        let events: EventHub
        do {
            events = try EventHub()
        } catch {
            throw StartError("cannot start the event hub", ["error": "\(error)"])
        }
        started.append(("event hub", { events.stop() }))

        // Sockets first, all of them: a bad address stops the start before anything serves.
        for a in addresses {
            do {
                switch a {
                case .unix(let path):
                    listeners.add(a, socket: try ListenSocket.unix(path: path, mode: 0o660), ownsFile: true)
                    if let gid = socketGID { try Files.setOwner(path, uid: 0, gid: gid) }
                case .tcp(let host, let port):
                    let s = try ListenSocket.tcp(host: host, port: port)
                    listeners.add(.tcp(host: host, port: s.port ?? port), socket: s, ownsFile: false)
                }
            } catch {
                let why = error.errno == .addressInUse ? "another mqtapd instance is serving it" : "\(error)"
                throw StartError("cannot listen on \(a)", ["address": a.description, "error": why])
            }
        }
        started.append(("listening sockets", { listeners.close() }))

        let router = Router(manager: manager, leaseWatcher: leaseWatcher, events: events, token: token)
        let handler = RequestLog(router: router, logger: log.logger).handle
        var limits = HTTPServer.Limits()
        limits.bodyBytes = options.maxBody
        // Lease connections have slots of their own: live leases never take the API's.
        limits.leaseConnections = options.maxLeases
        // Before the first readiness line: the state file's first write is over by then.
        manager.serving()
        do throws(HTTPServerError) {
            try listeners.serve(limits: limits, refusals: APIError.serverRefusals(token: token), handler: handler,
                                placement: router.placement(of:)) { address in
                log.info("listening", ["address": address.description])
                // The readiness line: tools wait for it.
                writeStderrLine("mqtapd: listening on \(address)")
            }
        } catch {
            throw StartError("cannot serve", ["error": error.description])
        }
        // Stopped first: no request reaches the manager once it begins to stop.
        started.append(("HTTP servers", { listeners.stopServing() }))

        state = .serving
        log.info("ready", ["workers": String(manager.workerCount), "max_queues": String(manager.limits().maxQueues)])
        // Type=notify: ready only now, with the state restored and every socket served.
        Systemd.notify("READY=1\nSTATUS=serving")
    }

    /// Waits for SIGTERM or SIGINT. SIGHUP (a reload, by habit) is logged and ignored: the
    /// daemon has no configuration file to reread and logs to stderr, which it never reopens;
    /// by default it would end the process without any cleanup.
    func waitForSignal() -> Int32 {
        while true {
            let s = Signals.wait([Signals.terminate, Signals.interrupt, Signals.hangUp])
            guard s == Signals.hangUp else { return s }
            log.info("SIGHUP ignored: there is nothing to reload", [:])
        }
    }

    /// Stops every part that started, in reverse. Idempotent.
    func stop() {
        guard state != .stopping && state != .stopped else { return }
        if state == .serving { Systemd.notify("STOPPING=1") }
        state = .stopping
        while let part = started.popLast() { part.stop() }
        state = .stopped
    }

    /// The TCP token: the file's content, trimmed; the file readable by its owner, and at most
    /// read by its group (so a scraper such as Prometheus, running as its own user, can be
    /// given it with `chgrp prometheus FILE; chmod 640 FILE`), never by others.
    private func readToken() throws(StartError) -> BearerToken? {
        guard let path = options.tokenFile else { return nil }
        let mode: UInt32
        let bytes: [UInt8]?
        do {
            mode = try Files.permissions(path)
            bytes = try Files.read(path)
        } catch {
            throw StartError("cannot read --token-file", ["path": path, "error": "\(error)"])
        }
        guard mode & 0o037 == 0 else {
            throw StartError("--token-file must be readable by its owner and at most its group (chmod 600 or 640)",
                             ["path": path, "mode": "0" + String(mode, radix: 8)])
        }
        guard let token = bytes.flatMap({ BearerToken(String(decoding: $0, as: UTF8.self)) }) else {
            throw StartError("--token-file is empty", ["path": path])
        }
        return token
    }

    private func resolveGroup() throws(StartError) -> UInt32? {
        guard let name = options.socketGroup else { return nil }
        guard let gid = Files.groupID(name) else {
            throw StartError("--socket-group names no group", ["group": name])
        }
        return gid
    }

    /// One instance per state directory and per socket: the locks die with the process, so a
    /// crash never leaves them held, and a socket file left by a crash is reclaimed.
    private func lockInstance(_ addresses: [ListenAddress]) throws(StartError) -> Locks {
        do {
            try makeDirectories(options.stateDir)
        } catch {
            throw StartError("cannot create the state directory", ["path": options.stateDir, "error": "\(error)"])
        }
        if let why = Files.unsafeDirectoryReason(options.stateDir) {
            throw StartError("refusing the state directory: \(why)", ["path": options.stateDir])
        }
        let locks = Locks()
        var paths = [(options.stateDir + "/lock", "state directory", false)]
        for case .unix(let path) in addresses {
            if let slash = path.lastIndex(of: "/"), slash != path.startIndex { try? makeDirectories(String(path[..<slash])) }
            paths.append((path + ".lock", "API socket \(path)", true))
        }
        for (path, what, removeFile) in paths {
            do {
                // A process killed with SIGKILL holds its locks until the kernel has closed
                // all its fds, which takes a moment with many queues: a restart right after
                // waits for that instead of failing.
                try locks.take(path, removeFile: removeFile, waiting: 5) {
                    self.log.warning("waiting for the lock: another process holds it; up to 5 s for it (a daemon just killed lets go once the kernel has closed its fds)",
                                     ["path": path])
                }
            } catch {
                locks.releaseAll()
                let why = error.errno == .wouldBlock ? "another mqtapd instance holds \(path)" : "\(error)"
                throw StartError("cannot lock the \(what)", ["path": path, "error": why])
            }
        }
        return locks
    }

    /// The desired state: an unusable file is set aside (never overwritten) and reported.
    private func loadState(_ stateFile: StateFile) throws(StartError) -> DesiredState? {
        do {
            return try stateFile.load()
        } catch {
            switch error {
            case .corrupt(let why):
                let aside = (try? stateFile.setAside(stamp: Clock.timestamp())) ?? "(could not be moved)"
                log.error("the state file is corrupt; it was set aside and the daemon starts empty",
                          ["path": stateFile.path, "kept_as": aside, "error": why])
                return nil
            case .unreadable(let e):
                throw StartError("cannot read the state file", ["path": stateFile.path, "error": "\(e)"])
            }
        }
    }

    private func restore(_ desired: DesiredState, into manager: DeviceManager) {
        for problem in manager.restore(desired) { log.error("device not restored", ["detail": problem]) }
        if let m = options.maxQueues, m != desired.maxQueues {
            do {
                _ = try manager.setLimit(maxQueues: m)
            } catch {
                log.error("--max-queues not applied; the state file's limit stays", ["error": error.description])
            }
        }
    }
}

/// The daemon's lock files, each lock owned by its own box until released.
final class Locks {
    private final class Held {
        var lock: FileLock?
        let removeFile: Bool
        init(_ lock: consuming FileLock, removeFile: Bool) {
            self.lock = consume lock
            self.removeFile = removeFile
        }
    }

    private var held: [Held] = []

    /// `removeFile`: the lock file goes with a clean stop (a socket's, next to the socket file
    /// that goes too); the state directory's stays.
    /// Retries while another process holds the lock, up to `seconds`; `waiting` is called once
    /// if it has to wait.
    func take(_ path: String, removeFile: Bool = false, waiting seconds: Double,
              onWait: () -> Void) throws(SyscallError) {
        let deadline = Clock.monotonicNanoseconds() + UInt64(seconds * 1e9)
        var told = false
        while true {
            do {
                held.append(Held(try FileLock(path: path), removeFile: removeFile))
                return
            } catch where error.errno == .wouldBlock && Clock.monotonicNanoseconds() < deadline {
                if !told { onWait() }
                told = true
                Clock.sleep(0.05)
            }
        }
    }

    /// Releases every lock (each exactly once). Idempotent.
    func releaseAll() {
        for h in held.reversed() {
            guard let lock = h.lock.take() else { continue }
            if h.removeFile { lock.releaseRemovingFile() } else { lock.release() }
        }
        held = []
    }
}

/// The listening sockets and the servers on them. A socket is owned by its entry until a
/// server takes it; a Unix socket file the daemon made is removed when it stops.
final class Listeners {
    private final class Entry {
        let address: ListenAddress
        var socket: ListeningSocket?
        var server: HTTPServer?
        /// The daemon made the file (systemd's sockets are systemd's to remove).
        let ownsFile: Bool

        init(_ address: ListenAddress, _ socket: consuming ListeningSocket, ownsFile: Bool) {
            self.address = address
            self.socket = consume socket
            self.ownsFile = ownsFile
        }
    }

    private var entries: [Entry] = []

    func add(_ address: ListenAddress, socket: consuming ListeningSocket, ownsFile: Bool) {
        entries.append(Entry(address, socket, ownsFile: ownsFile))
    }

    /// Starts a server on every socket; `ready` is called for each once it serves.
    func serve(limits: HTTPServer.Limits, refusals: HTTPServer.Refusals, handler: @escaping HTTPServer.Handler,
               placement: @escaping HTTPServer.Placement, ready: (ListenAddress) -> Void) throws(HTTPServerError) {
        for e in entries where e.server == nil {
            guard let socket = e.socket.take() else { continue }
            e.server = try HTTPServer(socket: socket, limits: limits, handler: handler, placement: placement,
                                      refusals: refusals)
            ready(e.address)
        }
    }

    /// Stops accepting and finishes in-flight requests on every server. Idempotent.
    func stopServing() {
        // Every listener refuses new requests at once; then each finishes what it has.
        for e in entries { e.server?.refuse() }
        for e in entries { e.server?.stop() }
    }

    /// Closes every socket (a server's with it) and removes the socket files the daemon made.
    /// Idempotent.
    func close() {
        for e in entries {
            e.server?.stop()
            e.server = nil
            _ = e.socket.take()
            if e.ownsFile, case .unix(let path) = e.address { removeFile(path) }
        }
        entries = []
    }
}
