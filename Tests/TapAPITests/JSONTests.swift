import Foundation
@testable import TapAPI
import Testing

@Suite("JSON over jansson")
struct JSONTests {
    @Test("parses every type and serialises compactly, keys in order")
    func roundTrip() throws {
        let text = #"{"b":true,"n":null,"i":-42,"d":1.5,"s":"h\u00e9\"llo","a":[1,[],{}],"o":{"z":1,"a":2}}"#
        let v = try JSON.parse(text)
        #expect(v["b"] == .bool(true))
        #expect(v["n"] == .null)
        #expect(v["i"] == .int(-42))
        #expect(v["d"] == .double(1.5))
        #expect(v["s"] == .string("hé\"llo"))
        #expect(v["a"] == [1, [], .object([:])])
        #expect(v.text == #"{"b":true,"n":null,"i":-42,"d":1.5,"s":"hé\"llo","a":[1,[],{}],"o":{"z":1,"a":2}}"#)
        #expect(try JSON.parse(v.serialized()) == v)
    }

    @Test("duplicate keys are rejected with jansson's line and column")
    func duplicates() {
        #expect(throws: JSON.ParseError.self) { try JSON.parse("{\n  \"a\": 1,\n  \"a\": 2\n}") }
        do {
            _ = try JSON.parse("{\n  \"a\": 1,\n  \"a\": 2\n}")
        } catch {
            #expect(error.line == 3)
            #expect(error.message.contains("duplicate"))
        }
    }

    @Test("malformed text keeps its position", arguments: [
        ("{", 1), ("{\"a\":}", 1), ("[1,2", 1), ("{\"a\":1}\n}", 2), ("{\"a\\u0000\":1}", 1), ("123456789012345678901234567890", 1),
    ])
    func malformed(_ text: String, line: Int) {
        do {
            _ = try JSON.parse(text)
            Issue.record("parsed \(text)")
        } catch {
            #expect(error.line == line, "\(error)")
            #expect(error.column >= 0)
            #expect(!error.message.isEmpty)
        }
    }

    @Test("\\u0000 in a string parses, and the string is read whole (the field refuses it)")
    func nulInString() throws {
        let v = try JSON.parse("{\"name\":\"ab\\u0000cd\"}")
        guard case .object(let o) = v, case .string(let name)? = o["name"] else {
            Issue.record("parsed as \(v)")
            return
        }
        #expect(Array(name.utf8) == [97, 98, 0, 99, 100])
    }

    @Test("texts larger than the first buffer, empty strings and keys, non-ASCII keys")
    func sizes() throws {
        // The serialiser dumps into 4 KiB first and again at the size jansson reports.
        for n in [0, 1, 4080, 4086, 4087, 4088, 4096, 100_000] {
            let v = JSON.object(["k": .string(String(repeating: "x", count: n))])
            let text = v.serialized()
            #expect(text.count == n + 8, "n=\(n)")
            #expect(try JSON.parse(text) == v)
        }
        let odd = JSON.object(["": .string(""), "ключ": .string("значение"), "a\"b": .array([.string("\n")])])
        #expect(odd.text == #"{"":"","ключ":"значение","a\"b":["\n"]}"#)
        #expect(try JSON.parse(odd.text) == odd)
    }

    @Test("u64 counters saturate instead of wrapping")
    func counters() {
        #expect(JSON(UInt64.max) == .int(Int64.max))
        #expect(JSON(UInt64(7)).text == "7")
    }
}

@Suite("request decoding")
struct DecodingTests {
    @Test("a full DeviceSpec")
    func fullSpec() throws {
        let body = #"{"name":"vm0","type":"tun","queues":4,"max_queues":8,"persist":true,"vnet_hdr":true,"mtu":9000,"up":false,"mode":"echo"}"#
        let s = try DevicesResource.decodeSpec(Array(body.utf8))
        #expect(s.name == "vm0" && s.kind == .tun && s.queues == 4 && s.maxQueues == 8)
        #expect(s.persist && s.vnetHdr && s.mtu == 9000 && !s.up && s.mode == .echo)
        let d = try DevicesResource.decodeSpec(Array(#"{"name":"t","mac":"02:00:00:00:00:0A"}"#.utf8))
        #expect(d.kind == .tap && d.queues == 1 && d.maxQueues == nil && d.up && d.mode == .sink)
        #expect(d.mac?.description == "02:00:00:00:00:0a")
    }

    @Test("errors name the field", arguments: [
        (#"{"name":"a","colour":1}"#, "unknown_field", "colour"),
        (#"{"queues":1}"#, "invalid_field", "name"),
        (#"{"name":5}"#, "invalid_field", "name"),
        (#"{"name":"a","queues":"4"}"#, "invalid_field", "queues"),
        (#"{"name":"a","queues":1.5}"#, "invalid_field", "queues"),
        (#"{"name":"a","queues":true}"#, "invalid_field", "queues"),
        (#"{"name":"a","persist":"yes"}"#, "invalid_field", "persist"),
        (#"{"name":"a","type":"bridge"}"#, "invalid_field", "type"),
        (#"{"name":"a","mode":"bounce"}"#, "invalid_field", "mode"),
        (#"{"name":"a","mac":"zz"}"#, "invalid_field", "mac"),
        (#"{"name":"a","mtu":null}"#, "invalid_field", "mtu"),
    ])
    func specErrors(_ body: String, code: String, field: String) {
        #expect(throws: APIError.self) { try DevicesResource.decodeSpec(Array(body.utf8)) }
        do {
            _ = try DevicesResource.decodeSpec(Array(body.utf8))
        } catch {
            #expect(error.code == code)
            #expect(error.field == field)
            #expect(error.status == 400)
        }
    }

    @Test("bodies that are not objects are invalid_json", arguments: ["", "  ", "[]", "1", "\"x\"", "null", "{"])
    func notObjects(_ body: String) {
        do {
            _ = try DevicesResource.decodeSpec(Array(body.utf8))
            Issue.record("accepted \(body)")
        } catch {
            #expect(error.code == "invalid_json")
        }
    }

    @Test("queue add: empty body means one; patch needs enabled")
    func queueBodies() throws {
        #expect(try QueuesResource.decodeAdd([]) == 1)
        #expect(try QueuesResource.decodeAdd(Array(#"{"count":3}"#.utf8)) == 3)
        #expect(throws: APIError.self) { try QueuesResource.decodeAdd(Array(#"{"n":3}"#.utf8)) }
        #expect(try QueuesResource.decodePatch(Array(#"{"enabled":false}"#.utf8)) == false)
        #expect(throws: APIError.invalidField("enabled", "is required")) { try QueuesResource.decodePatch(Array("{}".utf8)) }
        #expect(throws: APIError.invalidField("max_queues", "is required")) { try LimitsResource.decodePut(Array("{}".utf8)) }
        let p = try DevicesResource.decodePatch(Array(#"{"up":false,"mode":"echo"}"#.utf8))
        #expect(p == DevicePatchLiteral.downEcho)
    }
}

import TapCore
import TapJSON

enum DevicePatchLiteral {
    static let downEcho = DevicePatch(up: false, mode: .echo)
}

@Suite("listen addresses")
struct ListenTests {
    @Test func valid() throws {
        #expect(try ListenAddress(parsing: "unix:/run/mqtapd/api.sock") == .unix(path: "/run/mqtapd/api.sock"))
        #expect(try ListenAddress(parsing: "tcp:127.0.0.1:8080") == .tcp(host: "127.0.0.1", port: 8080))
        #expect(try ListenAddress(parsing: "tcp:localhost:0") == .tcp(host: "localhost", port: 0))
        #expect(try ListenAddress(parsing: "tcp:[::1]:9") == .tcp(host: "::1", port: 9))
        #expect(try ListenAddress(parsing: "tcp:[::1]:9").description == "tcp:[::1]:9")
    }

    @Test(arguments: ["", "unix:", "http://x", "tcp:127.0.0.1", "tcp:127.0.0.1:70000", "tcp::80", "tcp:[::1]80"])
    func malformed(_ s: String) {
        #expect(throws: ListenAddress.ParseError.malformed(s)) { try ListenAddress(parsing: s) }
    }

    @Test("never beyond loopback", arguments: ["tcp:0.0.0.0:80", "tcp:10.0.0.1:80", "tcp:[::]:80", "tcp:example.com:80"])
    func notLoopback(_ s: String) {
        #expect(throws: ListenAddress.ParseError.notLoopback(s)) { try ListenAddress(parsing: s) }
    }
}

@Suite("the embedded spec")
struct SpecTests {
    @Test("the served openapi.yaml is the repository's, byte for byte (SwiftPM embeds it through Sources/TapAPI/openapi.yaml)")
    func embedded() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let onDisk = try String(contentsOf: root.appendingPathComponent("openapi.yaml"), encoding: .utf8)
        #expect(SpecResource.yaml == onDisk)
    }
}
