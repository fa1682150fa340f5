@testable import TapAPI
import MQTVersion
import TapCore
import TapTestSupport
import Testing
import TunKit
import TapJSON

/// The router over a manager on the fake driver: no root, no sockets.
final class RouterFixture {
    let driver = FakeDriver()
    let manager: DeviceManager
    let router: Router
    let watcher: LeaseWatcher
    let events: EventHub

    init(token: String? = nil) throws {
        manager = try DeviceManager(driver: driver, workers: 2)
        watcher = try LeaseWatcher()
        events = try EventHub()
        router = Router(manager: manager, leaseWatcher: watcher, events: events, token: token.flatMap(BearerToken.init))
    }

    deinit {
        events.stop()
        watcher.stop()
        manager.shutdown()
    }

    func call(_ method: String, _ path: String, _ body: String? = nil, contentType: String? = "application/json") -> HTTPResponse {
        var headers: [String: String] = [:]
        if body != nil, let contentType { headers["content-type"] = contentType }
        // The server hands the router the path and the query apart.
        let parts = path.split(separator: "?", maxSplits: 1)
        var query: [String: String] = [:]
        for pair in parts.count > 1 ? parts[1].split(separator: "&") : [] {
            let kv = pair.split(separator: "=", maxSplits: 1)
            query[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
        }
        return router.handle(HTTPRequest(method: method, path: parts.isEmpty ? path : String(parts[0]), headers: headers,
                                         body: Array((body ?? "").utf8), query: query))
    }
}

extension HTTPResponse {
    var code: String? {
        if case .string(let s)? = json?["error"]?["code"] { return s }
        return nil
    }
}

@Suite("router")
struct RouterTests {
    @Test("routes", arguments: [
        ("/v1/health", Route.health), ("/v1/limits", .limits), ("/v1/devices", .devices),
        ("/v1/devices/tap0", .device("tap0")), ("/v1/devices/tap0/queues", .queues("tap0")),
        ("/v1/devices/tap0/queues/12", .queue("tap0", 12)), ("/v1/devices/tap0/stats", .stats("tap0")),
        ("/metrics", .metrics), ("/openapi.yaml", .spec), ("/v1/devices/tä0", .device("tä0")),
        ("/v1/devices/a/queues/0", .queue("a", 0)), ("/v1/devices/a/queues/999999999", .queue("a", 999_999_999)),
    ])
    func routes(_ path: String, _ route: Route) {
        #expect(Route(path: path) == route)
    }

    @Test("unknown paths", arguments: [
        "/", "", "/v1", "/v1/", "/v1/devices/", "/v2/devices", "/v1/devices/a/queues/x", "/v1/devices/a/queues/-1",
        "/v1/devices/a/queues/01", "/v1/devices/a/queues/1/x", "/v1/devices/a/other", "/metrics/", "/v1/health/x",
        "/v1/devices/a/queues/+1", "/v1/devices/a/queues/1000000000", "/v1//devices", "/v1/devices/a/queues/",
        "/v1/devices/a/stats/", "//v1/health", "v1/health", "/V1/health",
    ])
    func notFound(_ path: String) throws {
        #expect(Route(path: path) == nil)
        let f = try RouterFixture()
        let r = f.call("GET", path)
        #expect(r.status == 404 && r.code == "not_found")
    }

    @Test("a known path with a wrong method is 405 with Allow")
    func methodNotAllowed() throws {
        let f = try RouterFixture()
        let r = f.call("DELETE", "/v1/limits")
        #expect(r.status == 405 && r.code == "method_not_allowed")
        #expect(r.header("Allow") == "GET, HEAD, PUT")
        #expect(f.call("PUT", "/v1/devices").header("Allow") == "GET, HEAD, POST")
        #expect(f.call("POST", "/v1/devices/a/queues/1").header("Allow") == "GET, HEAD, PATCH, DELETE")
    }

    @Test("a body that is not JSON is 415 and changes nothing")
    func mediaType() throws {
        let f = try RouterFixture()
        #expect(f.call("POST", "/v1/devices", #"{"name":"a"}"#, contentType: "text/plain").status == 415)
        #expect(f.call("POST", "/v1/devices", #"{"name":"a"}"#, contentType: nil).code == "unsupported_media_type")
        #expect(f.call("POST", "/v1/devices", #"{"name":"a"}"#, contentType: "application/json; charset=utf-8").status == 201)
        #expect(f.driver.openFDs == 1)
    }

    @Test("create answers 201 with Location; the device reads back; delete is 204 then 404")
    func deviceLifecycle() throws {
        let f = try RouterFixture()
        let r = f.call("POST", "/v1/devices", #"{"name":"vm1","queues":3}"#)
        #expect(r.status == 201)
        #expect(r.header("Location") == "/v1/devices/vm1")
        #expect(r.json?["queue_count"] == 3)
        #expect(r.json?["enabled_queues"] == 3)
        #expect(r.json?["type"] == "tap")
        #expect(f.call("GET", "/v1/devices/vm1").json == r.json)
        #expect(f.call("GET", "/v1/devices").json?["devices"] == [r.json!])
        let del = f.call("DELETE", "/v1/devices/vm1")
        #expect(del.status == 204 && del.body.isEmpty)
        #expect(f.call("DELETE", "/v1/devices/vm1").status == 404)
    }

    @Test("every manager error maps to its status and code")
    func errorMapping() throws {
        let f = try RouterFixture()
        #expect(f.call("POST", "/v1/devices", #"{"name":"a b"}"#).code == "invalid_field")
        _ = f.call("POST", "/v1/devices", #"{"name":"d","queues":2,"max_queues":2}"#)
        let conflict = f.call("POST", "/v1/devices", #"{"name":"d"}"#)
        #expect(conflict.status == 409 && conflict.code == "name_conflict")
        let lo = f.call("POST", "/v1/devices", #"{"name":"lo"}"#)
        #expect(lo.json?["error"]?["errno"] == "EBUSY")
        let full = f.call("POST", "/v1/devices/d/queues", "")
        #expect(full.status == 409 && full.code == "queue_limit_exceeded")
        #expect(f.call("PUT", "/v1/limits", #"{"max_queues":1}"#).code == "limit_below_usage")
        _ = f.call("DELETE", "/v1/devices/d/queues/0")
        #expect(f.call("DELETE", "/v1/devices/d/queues/1").code == "last_queue")
        #expect(f.call("GET", "/v1/devices/d/queues/0").status == 404)
        f.driver.fail(.openQueue, with: .tooManyOpenFiles)
        let exhausted = f.call("POST", "/v1/devices", #"{"name":"e"}"#)
        #expect(exhausted.status == 503 && exhausted.code == "resource_exhausted")
        #expect(exhausted.json?["error"]?["errno"] == "EMFILE")
        f.driver.fail(.setMTU, with: .invalidArgument)
        let kernel = f.call("POST", "/v1/devices", #"{"name":"e","mtu":1400}"#)
        #expect(kernel.status == 500 && kernel.code == "kernel_error" && kernel.json?["error"]?["errno"] == "EINVAL")
    }

    @Test("queues: add, detach, re-attach, remove")
    func queues() throws {
        let f = try RouterFixture()
        _ = f.call("POST", "/v1/devices", #"{"name":"q"}"#)
        let added = f.call("POST", "/v1/devices/q/queues", #"{"count":2}"#)
        #expect(added.status == 201)
        #expect(added.json?["queues"].map { q -> [JSON] in if case .array(let a) = q { return a.compactMap { $0["id"] } } else { return [] } } == [1, 2])
        let off = f.call("PATCH", "/v1/devices/q/queues/1", #"{"enabled":false}"#)
        #expect(off.status == 200 && off.json?["enabled"] == false)
        #expect(f.call("GET", "/v1/devices/q").json?["enabled_queues"] == 2)
        #expect(f.call("PATCH", "/v1/devices/q/queues/1", #"{"enabled":true}"#).json?["enabled"] == true)
        #expect(f.call("DELETE", "/v1/devices/q/queues/2").status == 204)
        #expect(f.call("GET", "/v1/devices/q/queues").json?["queues"].map { if case .array(let a) = $0 { return a.count } else { return -1 } } == 2)
    }

    @Test("limits, stats, health, metrics, spec")
    func readOnly() throws {
        let f = try RouterFixture()
        _ = f.call("POST", "/v1/devices", #"{"name":"m","queues":2}"#)
        let limits = f.call("GET", "/v1/limits").json
        #expect(limits?["max_queues"] == 256 && limits?["kernel_max_queues"] == 256 && limits?["queues_in_use"] == 2)
        #expect(f.call("PUT", "/v1/limits", #"{"max_queues":8}"#).json?["max_queues"] == 8)
        #expect(f.call("PUT", "/v1/limits", #"{"max_queues":257}"#).code == "invalid_field")
        let stats = f.call("GET", "/v1/devices/m/stats").json
        #expect(stats?["total"]?["rx_packets"] == 0)
        #expect(f.call("GET", "/v1/health").json == ["status": "ok", "version": .string(Version.current)])
        let metrics = String(decoding: f.call("GET", "/metrics").body, as: UTF8.self)
        #expect(metrics.contains("mqtapd_queue_rx_packets_total{device=\"m\",queue=\"1\"} 0\n"))
        #expect(metrics.contains("# TYPE mqtapd_queue_rx_packets_total counter\n"))
        #expect(metrics.contains("mqtapd_device_queues{device=\"m\"} 2\n"))
        #expect(metrics.contains("mqtapd_build_info{version=\"\(Version.current)\"} 1\n"))
        #expect(f.call("GET", "/openapi.yaml").body == Array(SpecResource.yaml.utf8))
    }

    @Test("a 413 body keeps the API's error format")
    func payloadTooLarge() {
        let r = APIError.payloadTooLarge(limit: 65536).response
        #expect(r.status == 413 && r.code == "payload_too_large")
        #expect(r.errorInfo?.code == "payload_too_large" && r.errorInfo?.errno == nil)
    }

    @Test("error responses carry their code and errno for the request log; others carry none")
    func errorInfo() throws {
        let f = try RouterFixture()
        #expect(f.call("GET", "/v1/devices/nope").errorInfo?.code == "not_found")
        #expect(f.call("GET", "/v1/health").errorInfo == nil)
        let kernel = APIError(ManagerError.kernel(device: "d", step: .openQueue, call: "open", errno: .ioError)).response
        #expect(kernel.errorInfo?.code == kernel.code && kernel.errorInfo?.errno == "EIO")
    }

    @Test("a value outside the schema's range is 400 invalid_field naming the field, and changes nothing", arguments: [
        ("POST", "/v1/devices", #"{"name":"r","queues":0}"#, "queues"),
        ("POST", "/v1/devices", #"{"name":"r","queues":257}"#, "queues"),
        ("POST", "/v1/devices", #"{"name":"r","queues":300}"#, "queues"),
        ("POST", "/v1/devices", #"{"name":"r","queues":-9223372036854775808}"#, "queues"),
        ("POST", "/v1/devices", #"{"name":"r","max_queues":0}"#, "max_queues"),
        ("POST", "/v1/devices", #"{"name":"r","max_queues":257}"#, "max_queues"),
        ("POST", "/v1/devices", #"{"name":"r","mtu":67}"#, "mtu"),
        ("POST", "/v1/devices", #"{"name":"r","mtu":65522}"#, "mtu"),
        ("PATCH", "/v1/devices/d", #"{"max_queues":0}"#, "max_queues"),
        ("PATCH", "/v1/devices/d", #"{"max_queues":257}"#, "max_queues"),
        ("PATCH", "/v1/devices/d", #"{"mtu":67}"#, "mtu"),
        ("PATCH", "/v1/devices/d", #"{"mtu":9223372036854775807}"#, "mtu"),
        ("PUT", "/v1/limits", #"{"max_queues":0}"#, "max_queues"),
        ("PUT", "/v1/limits", #"{"max_queues":257}"#, "max_queues"),
        ("POST", "/v1/devices/d/queues", #"{"count":0}"#, "count"),
        ("POST", "/v1/devices/d/queues", #"{"count":257}"#, "count"),
        ("POST", "/v1/devices/d/queues", #"{"count":9223372036854775807}"#, "count"),
    ])
    func outOfSchema(_ method: String, _ path: String, _ body: String, _ field: String) throws {
        let f = try RouterFixture()
        #expect(f.call("POST", "/v1/devices", #"{"name":"d","queues":2}"#).status == 201)
        let before = f.call("GET", "/v1/devices").body
        let limits = f.call("GET", "/v1/limits").body
        let r = f.call(method, path, body)
        #expect(r.status == 400 && r.code == "invalid_field")
        #expect(r.json?["error"]?["field"] == .string(field))
        #expect(f.call("GET", "/v1/devices").body == before)
        #expect(f.call("GET", "/v1/limits").body == limits)
        #expect(f.driver.openFDs == 2)
    }

    @Test("Allow comes from the routing table: every route kind has handlers, and each listed method is served")
    func routingTable() throws {
        let f = try RouterFixture()
        let samples: [Route.Kind: String] = [
            .health: "/v1/health", .limits: "/v1/limits", .devices: "/v1/devices", .device: "/v1/devices/x",
            .queues: "/v1/devices/x/queues", .queue: "/v1/devices/x/queues/0", .stats: "/v1/devices/x/stats",
            .metrics: "/metrics", .spec: "/openapi.yaml", .leases: "/v1/devices/x/leases",
            .lease: "/v1/devices/x/leases/lease-1", .events: "/v1/events",
        ]
        for (kind, path) in samples {
            #expect(Route(path: path)?.kind == kind)
            let methods = Router.methods(of: kind)
            #expect(!methods.isEmpty)
            for m in ["GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"] {
                // A GET of the events would follow forever: ask for what is kept only.
                let target = kind == .events ? path + "?follow=false" : path
                let r = f.call(m, target, m == "GET" || m == "DELETE" ? nil : "{}")
                if methods.contains(m) {
                    #expect(r.status != 405, "\(m) \(path)")
                } else {
                    #expect(r.status == 405 && r.header("Allow") == methods.joined(separator: ", "), "\(m) \(path)")
                }
            }
        }
    }

    @Test("once the manager stops, a change is 503 shutting_down; a kept device's change is 409 device_not_active")
    func shuttingDownAndNotActive() throws {
        let f = try RouterFixture()
        #expect(f.call("POST", "/v1/devices", #"{"name":"d"}"#).status == 201)
        f.manager.shutdown()
        let r = f.call("POST", "/v1/devices", #"{"name":"e"}"#)
        #expect(r.status == 503 && r.code == "shutting_down")
        #expect(f.call("PUT", "/v1/limits", #"{"max_queues":8}"#).code == "shutting_down")
        let kept = APIError(ManagerError.deviceNotActive(name: "k", status: .failed("EIO"))).response
        #expect(kept.status == 409 && kept.code == "device_not_active")
        let feature = APIError(ManagerError.featureMissing(feature: "IFF_VNET_HDR", field: "vnet_hdr")).response
        #expect(feature.status == 400 && feature.code == "feature_unsupported" && feature.json?["error"]?["field"] == "vnet_hdr")
    }

    @Test("a read the kernel refused says so: stats answer kernel: null with kernel_error, the device view kernel_error; a queue add that needs the kernel's count is refused")
    func kernelError() throws {
        let f = try RouterFixture()
        #expect(f.call("POST", "/v1/devices", #"{"name":"d"}"#).status == 201)
        #expect(f.call("GET", "/v1/devices/d").json?["kernel_error"] == nil)
        f.driver.failStatistics(.accessDenied)
        let r = f.call("GET", "/v1/devices/d/stats")
        #expect(r.status == 200 && r.json?["kernel"] == .null)
        #expect(r.json?["kernel_error"]?["errno"] == "EACCES")
        let d = f.call("GET", "/v1/devices/d")
        #expect(d.status == 200 && d.json?["kernel_error"]?["errno"] == "EACCES")
        let add = f.call("POST", "/v1/devices/d/queues", #"{"count":1}"#)
        #expect(add.status == 500 && add.code == "kernel_error")
        #expect(f.call("GET", "/v1/devices/d/queues").json?["queues"]?.array?.count == 1, "the refused add changed nothing")
    }

    @Test("over TCP every request needs the bearer token, health and metrics included; the Unix socket needs none")
    func bearerToken() throws {
        let f = try RouterFixture(token: "s3cret-token\n")
        func tcp(_ path: String, _ auth: String?) -> HTTPResponse {
            var headers: [String: String] = [:]
            if let auth { headers["authorization"] = auth }
            return f.router.handle(HTTPRequest(method: "GET", path: path, headers: headers, transport: .tcp))
        }
        for path in ["/v1/health", "/metrics", "/v1/devices", "/nope"] {
            for auth in [nil, "Bearer wrong", "Bearer s3cret-toke", "Bearer s3cret-tokenX", "Basic s3cret-token", "s3cret-token", ""] {
                let r = tcp(path, auth)
                #expect(r.status == 401 && r.code == "unauthorized", "\(path) \(auth ?? "-")")
                #expect(r.header("WWW-Authenticate")?.hasPrefix("Bearer") == true)
                #expect(!String(decoding: r.body, as: UTF8.self).contains("s3cret"))
            }
        }
        #expect(tcp("/v1/health", "Bearer s3cret-token").status == 200)
        #expect(tcp("/v1/health", "bearer s3cret-token").status == 200, "the scheme is case-insensitive")
        #expect(tcp("/nope", "Bearer s3cret-token").status == 404)
        #expect(f.call("GET", "/v1/health").status == 200, "a Unix-socket request needs no token")
        // Without a configured token, TCP is refused outright.
        let open = try RouterFixture()
        #expect(open.router.handle(HTTPRequest(method: "GET", path: "/v1/health", transport: .tcp)).status == 401)
    }
}
