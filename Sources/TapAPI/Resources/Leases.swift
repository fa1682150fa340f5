import TapCore
import TapJSON
import TunKit

/// `/v1/devices/{name}/leases` and `/v1/devices/{name}/leases/{id}`: queues handed to a
/// holder (a VMM) over the Unix socket, for as long as the upgraded connection is open.
enum LeasesResource {
    static let protocolName = "mqtapd-lease/1"

    /// POST body: optional `{"queues": [ids], "holder": "text"}`.
    static func decodeRequest(_ bytes: [UInt8]) throws(APIError) -> LeaseRequest {
        let b = try Body(bytes, allowed: ["queues", "holder"], required: false)
        return LeaseRequest(queues: try b.intArray("queues", in: 0...(Tun.kernelMaxQueues - 1)), holder: try b.string("holder"))
    }

    static func encode(_ l: LeaseInfo) -> JSON {
        var o: JSONObject = ["id": .string(l.id), "queues": .array(l.queues.map { JSON($0) })]
        if let h = l.holder { o["holder"] = .string(h) }
        o["pid"] = JSON(Int(l.peer.pid))
        o["uid"] = JSON(Int(l.peer.uid))
        o["gid"] = JSON(Int(l.peer.gid))
        o["since"] = .string(l.since)
        o["state"] = .string(l.state.rawValue)
        return .object(o)
    }

    static func list(_ m: DeviceManager, _ device: String) throws -> HTTPResponse {
        .json(200, ["leases": .array(try m.leases(device).map(encode))])
    }

    /// Takes a lease: checks, grants, and answers 101; the fds travel on the upgraded
    /// connection (`handOver`). Every refusal is an ordinary error and changes nothing.
    static func take(_ m: DeviceManager, _ watcher: LeaseWatcher, _ device: String, _ r: HTTPRequest) throws -> HTTPResponse {
        guard case .unix(let peer) = r.transport else {
            throw APIError.unixSocketRequired("a lease passes fds")
        }
        guard r.asksUpgrade(to: protocolName) else {
            throw APIError.upgradeRequired(protocolName)
        }
        let request = try decodeRequest(r.body)
        let lease = try m.grantLease(device, request, peer: peer ?? Peer(pid: 0, uid: 0, gid: 0))
        return .switching(Upgrade(
            protocolName: protocolName,
            run: { connection in handOver(lease, on: connection, watcher) },
            abandon: { lease.end() }))
    }

    /// After the 101: one JSON line with the fds (SCM_RIGHTS, in the order of `queues`), then
    /// the connection is watched; the lease lasts until it closes.
    static func handOver(_ lease: Lease, on connection: UpgradedConnection, _ watcher: LeaseWatcher) {
        let line: JSON = [
            "lease": .string(lease.id), "device": .string(lease.device),
            "queues": .array(lease.queues.map { ["id": JSON($0.id), "enabled": .bool($0.enabled)] }),
        ]
        do {
            try UnixSocket.send(connection.fd, line.serialized() + [UInt8(ascii: "\n")], passing: lease.fds)
        } catch {
            lease.end()
            connection.close()
            return
        }
        // The holder has its own fds now.
        lease.close()
        // Watched first, then connected: a hang-up in between ends the lease, and a revoke in
        // between finds it no longer offered, so `connect` says so and it is closed here.
        let watching = watcher.watch(connection) { lease.end() }
        guard watching, lease.connect(connection) else {
            lease.end()
            connection.close()
            return
        }
    }

    static func revoke(_ m: DeviceManager, _ device: String, _ id: String) throws -> HTTPResponse {
        try m.revokeLease(device: device, lease: id)
        return .noContent
    }
}

extension UpgradedConnection: LeaseConnection {}
