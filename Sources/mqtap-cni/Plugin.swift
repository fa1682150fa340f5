import TapClient
import TapJSON
import TunKit

/// `mqtap-cni`: a CNI plugin (spec 1.0.0, with 1.1's STATUS and GC) that asks mqtapd for a
/// persistent tap named CNI_IFNAME inside CNI_NETNS, delegates addressing to the IPAM plugin
/// the config names, and gives the runtime the spec's result. The daemon keeps the device
/// (limits, counters, events, restarts); the plugin holds nothing.
@main
enum Plugin {
    static func main() {
        // A delegated plugin that exits before reading all of its stdin must not kill us.
        Process.ignoreBrokenPipe()
        var env: [String: String] = [:]
        let all = Process.environment
        for e in all {
            let kv = e.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            env[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
        }
        // The network config, whole (the runtime closes the pipe after it).
        let input = ((try? Files.read("/dev/stdin")) ?? nil) ?? []
        let version = (try? JSON.parse(input))?["cniVersion"]?.string ?? "1.0.0"
        if env["CNI_COMMAND"] == "VERSION" {
            // Needs nothing else: runtimes ask it of every plugin when they load a network.
            emit(["cniVersion": .string(version), "supportedVersions": .array(supportedVersions.map { .string($0) })])
            Process.exit(0)
        }
        do throws(CNIError) {
            let inv = try Invocation.from(environment: env, all: all, stdin: input)
            guard supportedVersions.contains(inv.config.cniVersion) else {
                throw CNIError(code: CNIError.incompatibleVersion, msg: "incompatible CNI versions",
                               details: "config is \(inv.config.cniVersion), plugin supports \(supportedVersions.joined(separator: ", "))")
            }
            let daemon = Daemon(client: APIClient(.unix(inv.config.socket)))
            switch inv.command {
            case "ADD": emit(try add(inv, daemon))
            case "DEL": try delete(inv, daemon)
            case "CHECK": try check(inv, daemon)
            case "STATUS": try status(inv, daemon)
            case "GC": try gc(inv, daemon)
            default: throw CNIError(code: CNIError.invalidEnvironment, msg: "unknown CNI_COMMAND \(inv.command)")
            }
            Process.exit(0)
        } catch {
            emit(error.json(version: version))
            Process.exit(1)
        }
    }

    static func emit(_ j: JSON) { writeStdoutLine(j.text) }

    // MARK: - Commands

    static func add(_ inv: Invocation, _ daemon: Daemon) throws(CNIError) -> JSON {
        let c = inv.config
        var labels: JSONObject = ["cni.container_id": .string(inv.containerID), "cni.ifname": .string(inv.ifname),
                                  "cni.network": .string(c.name)]
        labels["cni.netns"] = .string(inv.netns)
        var body: JSONObject = [
            "name": .string(inv.deviceName), "ifname": .string(inv.ifname), "netns": .string(inv.netns),
            "queues": JSON(c.queues), "mode": .string(c.mode), "persist": true, "up": true, "labels": .object(labels),
        ]
        if c.vnetHdr { body["vnet_hdr"] = true }
        if !c.multiQueue { body["multi_queue"] = false }
        if let o = c.owner { body["owner"] = JSON(o) }
        if let g = c.group { body["group"] = JSON(g) }
        if let m = c.mtu { body["mtu"] = JSON(m) }
        if let m = c.mac { body["mac"] = .string(m) }
        let device = try daemon.call("POST", "/v1/devices", .object(body), expect: 201)
        let undoDevice = { _ = try? daemon.call("DELETE", "/v1/devices/\(inv.deviceName)?force=true", expect: 204) }
        guard let mac = device["mac"]?.string else {
            undoDevice()
            throw CNIError(code: CNIError.daemonRefused, msg: "mqtapd gave no MAC address for \(inv.ifname)")
        }
        var ips: [JSON] = []
        var routes: [JSON] = []
        var dns = c.dns
        if let ipam = c.ipamType {
            let result: JSON
            do throws(CNIError) {
                result = try delegate(ipam, "ADD", inv)
            } catch {
                undoDevice()
                throw error
            }
            ips = result["ips"]?.array ?? []
            routes = result["routes"]?.array ?? []
            if dns == nil { dns = result["dns"] }
            guard !ips.isEmpty else {
                _ = try? delegate(ipam, "DEL", inv)
                undoDevice()
                throw CNIError(code: CNIError.invalidConfig, msg: "IPAM plugin \(ipam) returned no IP configuration")
            }
            do throws(CNIError) {
                try configure(inv, ips: ips, routes: routes)
            } catch {
                _ = try? delegate(ipam, "DEL", inv)
                undoDevice()
                throw error
            }
        }
        // In a chain, what came before is passed on with this interface added.
        var interfaces = c.prevResult?["interfaces"]?.array ?? []
        let index = interfaces.count
        interfaces.append(["name": .string(inv.ifname), "mac": .string(mac), "sandbox": .string(inv.netns)])
        var allIPs = c.prevResult?["ips"]?.array ?? []
        for ip in ips {
            guard case .object(var o) = ip else { continue }
            o["interface"] = JSON(index)
            allIPs.append(.object(o))
        }
        var out: JSONObject = ["cniVersion": .string(c.cniVersion), "interfaces": .array(interfaces)]
        if !allIPs.isEmpty { out["ips"] = .array(allIPs) }
        let allRoutes = (c.prevResult?["routes"]?.array ?? []) + routes
        if !allRoutes.isEmpty { out["routes"] = .array(allRoutes) }
        if let d = c.prevResult?["dns"] ?? dns { out["dns"] = d }
        return .object(out)
    }

    /// DEL: idempotent. The addresses go back to IPAM; the device, if the daemon has it and it
    /// is this container's, is deleted (with its link, wherever it is).
    static func delete(_ inv: Invocation, _ daemon: Daemon) throws(CNIError) {
        // Both halves are tried whatever the other does; the first failure is reported.
        var failure: CNIError?
        do throws(CNIError) {
            if let device = try daemon.find(inv.deviceName),
               device["labels"]?["cni.container_id"]?.string == inv.containerID {
                _ = try daemon.call("DELETE", "/v1/devices/\(inv.deviceName)?force=true", expect: 204, orNotFound: true)
            }
        } catch {
            failure = error
        }
        if let ipam = inv.config.ipamType {
            do throws(CNIError) {
                _ = try delegate(ipam, "DEL", inv)
            } catch {
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
    }

    /// CHECK: the device is there, in the container's namespace, as the config asks; the
    /// previous result names it; IPAM agrees.
    static func check(_ inv: Invocation, _ daemon: Daemon) throws(CNIError) {
        let c = inv.config
        guard let prev = c.prevResult else {
            throw CNIError(code: CNIError.invalidConfig, msg: "Required prevResult missing")
        }
        guard (prev["interfaces"]?.array ?? []).contains(where: { $0["name"]?.string == inv.ifname && $0["sandbox"]?.string == inv.netns }) else {
            throw CNIError(code: CNIError.daemonRefused, msg: "prevResult names no interface \(inv.ifname) in \(inv.netns)")
        }
        guard let d = try daemon.find(inv.deviceName) else {
            throw CNIError(code: CNIError.containerUnknown, msg: "mqtapd has no device for \(inv.ifname) of container \(inv.containerID)")
        }
        var wrong: [String] = []
        func expect(_ what: String, _ have: JSON?, _ want: JSON?) {
            if have != want { wrong.append("\(what) is \(have?.text ?? "none"), the config says \(want?.text ?? "none")") }
        }
        expect("state", d["state"], "active")
        expect("queue_count", d["queue_count"], JSON(c.queues))
        expect("mode", d["mode"], .string(c.mode))
        expect("multi_queue", d["multi_queue"], .bool(c.multiQueue))
        expect("vnet_hdr", d["vnet_hdr"], .bool(c.vnetHdr))
        if let o = c.owner { expect("owner", d["owner"], JSON(o)) }
        if let g = c.group { expect("group", d["group"], JSON(g)) }
        if let m = c.mtu { expect("mtu", d["mtu"], JSON(m)) }
        expect("kernel_name", d["kernel_name"], .string(inv.ifname))
        if let ns = try? Netns.open(path: inv.netns), let inode = try? Netns.inode(ns.fd) {
            expect("netns inode", d["netns"]?["inode"], JSON(Int(truncatingIfNeeded: inode)))
        } else {
            wrong.append("the container's namespace \(inv.netns) cannot be opened")
        }
        guard wrong.isEmpty else {
            throw CNIError(code: CNIError.daemonRefused, msg: "the device does not match the config", details: wrong.joined(separator: "; "))
        }
        if let ipam = c.ipamType { _ = try delegate(ipam, "CHECK", inv) }
    }

    /// STATUS (1.1): ready when the daemon answers.
    static func status(_ inv: Invocation, _ daemon: Daemon) throws(CNIError) {
        do throws(CNIError) {
            _ = try daemon.call("GET", "/v1/health", expect: 200)
        } catch {
            throw CNIError(code: CNIError.notAvailable, msg: "mqtapd is not available", details: error.msg)
        }
        if let ipam = inv.config.ipamType, speaks11(ipam, inv) { _ = try delegate(ipam, "STATUS", inv) }
    }

    /// GC (1.1): this network's devices whose attachment the runtime no longer lists go.
    static func gc(_ inv: Invocation, _ daemon: Daemon) throws(CNIError) {
        let conf = try? JSON.parse(inv.stdin)
        // The spec's key; libcni also sends the older one. With neither, nothing is known to
        // be stale: nothing goes.
        guard let attachments = conf?["cni.dev/valid-attachments"]?.array ?? conf?["cni.dev/attachments"]?.array else { return }
        let valid = Set(attachments.compactMap { a -> String? in
            guard let id = a["containerID"]?.string, let ifname = a["ifname"]?.string else { return nil }
            return id + "/" + ifname
        })
        let list = try daemon.call("GET", "/v1/devices", expect: 200)
        var failures: [String] = []
        for d in list["devices"]?.array ?? [] {
            guard let labels = d["labels"], labels["cni.network"]?.string == inv.config.name,
                  let id = labels["cni.container_id"]?.string, let ifname = labels["cni.ifname"]?.string,
                  let name = d["name"]?.string, !valid.contains(id + "/" + ifname) else { continue }
            do throws(CNIError) {
                _ = try daemon.call("DELETE", "/v1/devices/\(name)?force=true", expect: 204, orNotFound: true)
            } catch {
                failures.append("\(name): \(error.msg)")
            }
        }
        if let ipam = inv.config.ipamType, speaks11(ipam, inv) { _ = try delegate(ipam, "GC", inv) }
        guard failures.isEmpty else {
            throw CNIError(code: CNIError.daemonRefused, msg: "some devices were not removed", details: failures.joined(separator: "; "))
        }
    }

    // MARK: - IPAM and addresses

    /// Whether the IPAM plugin knows 1.1's STATUS and GC (its VERSION lists 1.1.0): one
    /// that does not is not asked (Debian's host-local speaks up to 1.0.0).
    static func speaks11(_ type: String, _ inv: Invocation) -> Bool {
        guard let v = try? delegate(type, "VERSION", inv) else { return false }
        return (v["supportedVersions"]?.array ?? []).contains { $0.string == "1.1.0" }
    }

    /// Runs the IPAM plugin `type` from CNI_PATH with our environment (CNI_COMMAND as given)
    /// and the same stdin, as the spec's delegation says; its result, or its error passed on.
    static func delegate(_ type: String, _ command: String, _ inv: Invocation) throws(CNIError) -> JSON {
        guard let path = Process.executable(type, in: inv.path) else {
            throw CNIError(code: CNIError.invalidConfig, msg: "failed to find plugin \"\(type)\" in path \(inv.path)")
        }
        let env = inv.environment.filter { !$0.hasPrefix("CNI_COMMAND=") } + ["CNI_COMMAND=" + command]
        let outcome: Process.Outcome
        do {
            outcome = try Process.run([path], environment: env, input: inv.stdin)
        } catch {
            throw CNIError(code: CNIError.ioFailure, msg: "cannot run the IPAM plugin \(path)", details: "\(error)")
        }
        let out = (try? JSON.parse(outcome.output)) ?? .null
        guard outcome.status == 0 else {
            throw CNIError(code: out["code"]?.int ?? CNIError.daemonRefused,
                           msg: out["msg"]?.string ?? "IPAM plugin \(type) failed (exit \(outcome.status))",
                           details: out["details"]?.string ?? String(decoding: outcome.output, as: UTF8.self))
        }
        return out
    }

    /// The IPAM result applied inside the container's namespace: each address on the
    /// interface, then the routes (through the address's gateway unless the route names one).
    static func configure(_ inv: Invocation, ips: [JSON], routes: [JSON]) throws(CNIError) {
        var steps: [[String]] = []
        for ip in ips {
            guard let address = ip["address"]?.string else { continue }
            steps.append(["ip", "addr", "add", address, "dev", inv.ifname])
        }
        steps.append(["ip", "link", "set", "dev", inv.ifname, "up"])
        let gateway = ips.compactMap { $0["gateway"]?.string }.first
        for r in routes {
            guard let dst = r["dst"]?.string else { continue }
            var cmd = ["ip", "route", "add", dst]
            if let gw = r["gw"]?.string ?? gateway { cmd += ["via", gw] }
            steps.append(cmd + ["dev", inv.ifname])
        }
        for step in steps {
            let outcome: Process.Outcome
            do {
                outcome = try Process.run(["nsenter", "--net=" + inv.netns] + step,
                                          environment: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
            } catch {
                throw CNIError(code: CNIError.ioFailure, msg: "cannot run nsenter", details: "\(error)")
            }
            guard outcome.status == 0 else {
                throw CNIError(code: CNIError.ioFailure, msg: "\(step.joined(separator: " ")) failed in \(inv.netns)")
            }
        }
    }
}

/// The daemon, through the project's client: every answer or failure as a CNI error.
struct Daemon {
    let client: APIClient

    func call(_ method: String, _ path: String, _ body: JSON? = nil, expect: Int, orNotFound: Bool = false) throws(CNIError) -> JSON {
        let r: APIClient.Response
        do {
            r = try client.request(method, path, body: body)
        } catch {
            // Not there yet (or restarting): the runtime may try again.
            throw CNIError(code: CNIError.tryAgainLater, msg: "mqtapd cannot be reached", details: error.description)
        }
        if r.status == expect || (orNotFound && r.status == 404) { return r.json ?? .null }
        let e = r.error ?? (code: "http_\(r.status)", message: "unexpected answer")
        let code: Int
        switch r.status {
        case 400: code = CNIError.invalidConfig
        case 404 where path == "/v1/devices": code = CNIError.containerUnknown
        case 503: code = CNIError.tryAgainLater
        default: code = CNIError.daemonRefused
        }
        throw CNIError(code: code, msg: "mqtapd: \(e.code): \(e.message)", details: "\(method) \(path) → \(r.status)")
    }

    /// The device called `name`, or nil if the daemon has none.
    func find(_ name: String) throws(CNIError) -> JSON? {
        let d = try call("GET", "/v1/devices/\(name)", expect: 200, orNotFound: true)
        return d["name"] == nil ? nil : d
    }
}
