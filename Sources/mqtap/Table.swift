import TapClient
import TapJSON

/// Human output: aligned columns, numbers right-aligned.
enum Table {
    static func render(_ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in
                let pad = String(repeating: " ", count: widths[i] - c.count)
                return c.first?.isNumber == true ? pad + c : c + pad
            }.joined(separator: "  ").trimmingTrailingSpaces
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }

    static func devices(_ list: [JSON]) -> String {
        render(["NAME", "TYPE", "QUEUES", "ENABLED", "MAX", "MODE", "UP", "MTU", "VNET", "PERSIST", "MAC", "STATE"], list.map { d in
            // forward shows its peer, and whether it is there: forward>b, forward>b(missing).
            var mode = d["mode"]?.string ?? ""
            if let peer = d["peer"]?.string {
                mode += ">" + peer + (d["peer_state"]?.string == "missing" ? "(missing)" : "")
            }
            return [d["name"]?.string ?? "", d["type"]?.string ?? "", d["queue_count"]?.description ?? "",
             d["enabled_queues"]?.description ?? "", d["max_queues"]?.description ?? "", mode,
             d["up"]?.description ?? "", d["mtu"]?.description ?? "-", d["vnet_hdr"]?.description ?? "",
             d["persist"]?.description ?? "", d["mac"]?.string ?? "-", d["state"]?.string ?? ""]
        })
    }

    static func device(_ d: JSON) -> String {
        var out = devices([d])
        if let reason = d["state_reason"]?.string { out += "\nreason: \(reason)" }
        // Where the kernel has it, when that is not simply here under its own name.
        if case .object(let ns)? = d["netns"], ns["own"] != .bool(true) {
            out += "\nnetns: " + (ns["name"]?.string ?? "inode \(ns["inode"]?.description ?? "?")")
        }
        if let consumer = d["consumer"]?.string, consumer != "daemon" { out += "\nconsumer: \(consumer)" }
        if let k = d["kernel_name"]?.string, k != d["name"]?.string { out += "\nkernel name: \(k)" }
        if d["multi_queue"] == .bool(false) { out += "\nsingle queue (not IFF_MULTI_QUEUE)" }
        if case .object(let labels)? = d["labels"] {
            out += "\nlabels: " + labels.entries.map { "\($0.key)=\($0.value.string ?? "")" }.joined(separator: " ")
        }
        if let foreign = d["foreign_queues"]?.int, foreign > 0 { out += "\nforeign queues: \(foreign)" }
        if let revoked = d["revoked_queues"]?.int, revoked > 0 { out += "\nrevoked queues kept detached: \(revoked)" }
        if let size = d["vnet_hdr_size"]?.int, d["vnet_hdr"] == .bool(true) { out += "\nvnet header: \(size) bytes" }
        if let differ = d["settings_differ"]?.array, !differ.isEmpty {
            out += "\nchanged by a holder: " + differ.compactMap(\.string).joined(separator: ", ")
        }
        if let owner = d["owner"]?.description { out += "\nowner: \(owner)" }
        if let group = d["group"]?.description { out += "\ngroup: \(group)" }
        let queues = d["queues"]?.array ?? []
        if !queues.isEmpty { out += "\n\n" + Self.queues(queues) }
        return out
    }

    static func queues(_ list: [JSON]) -> String {
        render(["ID", "ENABLED", "WORKER", "LEASE", "RX_PACKETS", "RX_BYTES", "TX_PACKETS", "TX_BYTES", "ERRORS", "DROPPED"],
               list.map { q in
            let c = q["counters"]
            let errors = (c?["rx_errors"]?.int ?? 0) + (c?["tx_errors"]?.int ?? 0)
            let lease = q["lease"]?.string.map { $0 + (q["lease_state"]?.string == "orphaned" ? " (orphaned)" : "") } ?? "-"
            return [q["id"]?.description ?? "", q["enabled"]?.description ?? "", q["worker"]?.description ?? "-", lease,
                    c?["rx_packets"]?.description ?? "", c?["rx_bytes"]?.description ?? "",
                    c?["tx_packets"]?.description ?? "", c?["tx_bytes"]?.description ?? "", String(errors),
                    c?["dropped"]?.description ?? "0"]
        })
    }

    /// One event as a line: `TIME ID TYPE DEVICE key=value…`.
    static func event(_ e: JSON) -> String {
        var parts = [e["time"]?.string ?? "", e["id"]?.description ?? "", e["type"]?.string ?? "",
                     e["device"]?.string ?? "-"]
        for key in ["queue", "by", "lease"] {
            if let v = e[key] { parts.append("\(key)=\(v.string ?? v.description)") }
        }
        if case .object(let c)? = e["changes"] {
            for (k, v) in c.entries { parts.append("\(k)=\(v.string ?? v.description)") }
        }
        return parts.joined(separator: " ")
    }

    static func leases(_ list: [JSON]) -> String {
        render(["ID", "QUEUES", "HOLDER", "PID", "UID", "GID", "SINCE", "STATE"], list.map { l in
            [l["id"]?.string ?? "", ids(l["queues"]), l["holder"]?.string ?? "-", l["pid"]?.description ?? "",
             l["uid"]?.description ?? "", l["gid"]?.description ?? "", l["since"]?.string ?? "", l["state"]?.string ?? ""]
        })
    }

    /// Queue ids (numbers, or objects with an `id`) as `0,1,2`.
    static func ids(_ v: JSON?) -> String {
        (v?.array ?? []).map { ($0["id"] ?? $0).description }.joined(separator: ",")
    }

    static func limits(_ l: JSON) -> String {
        render(["MAX_QUEUES", "KERNEL_MAX", "DEVICES", "QUEUES_IN_USE", "OPEN_FILES", "OPEN_FILES_LIMIT"], [[
            l["max_queues"]?.description ?? "", l["kernel_max_queues"]?.description ?? "",
            l["devices"]?.description ?? "", l["queues_in_use"]?.description ?? "",
            l["open_files"]?.description ?? "", l["open_files_limit"]?.description ?? "",
        ]])
    }

    /// Per-queue counters; with the previous sample, rates per second too.
    static let statsLegend = "rx: frames the daemon read from a queue (the kernel sent them into the device); "
        + "tx: frames written into a queue (the kernel received them)"
    static let statsHeader = ["QUEUE", "RX_PACKETS", "RX_PPS", "RX_BYTES", "RX_BPS", "TX_PACKETS", "TX_PPS", "TX_BYTES",
                              "TX_BPS", "RX_ERRORS", "TX_ERRORS", "DROPPED"]
    /// Fixed widths for lines printed one sample at a time (no table to align them in).
    static let lineWidths = [24, 6, 12, 9, 14, 11, 12, 9, 14, 11, 9, 9, 9]

    static func fixed(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in
            let w = lineWidths[min(i, lineWidths.count - 1)]
            let pad = String(repeating: " ", count: max(0, w - c.count))
            return i == 0 ? c + pad : pad + c
        }.joined(separator: " ").trimmingTrailingSpaces
    }

    static var statsLineHeader: String { fixed(["TIME"] + statsHeader) }

    /// One line per queue and one for the total, each starting with `time`.
    static func statsLines(_ s: JSON, previous: (JSON, Double)?, time: String) -> [String] {
        statsRows(s, previous: previous).map { fixed([time] + $0) }
    }

    static func stats(_ s: JSON, previous: (JSON, Double)?) -> String {
        var out = statsLegend + "\n"
        out += render(statsHeader, statsRows(s, previous: previous))
        if case .object(let k)? = s["kernel"] {
            out += "\nkernel: " + k.entries.map { "\($0.key) \($0.value.description)" }.joined(separator: "  ")
        } else if let e = s["kernel_error"] {
            out += "\nkernel: not read (\(e["errno"]?.string ?? "?"))"
        }
        return out
    }

    static func statsRows(_ s: JSON, previous: (JSON, Double)?) -> [[String]] {
        func rate(_ id: JSON?, _ key: String, _ now: JSON) -> String {
            guard let (old, dt) = previous, dt > 0 else { return "-" }
            let before = (old["queues"]?.array ?? []).first { $0["id"] == id }?[key]?.int
                ?? (id == nil ? old["total"]?[key]?.int : nil)
            guard let before, let after = now[key]?.int else { return "-" }
            return String(Int((Double(after - before) / dt).rounded()))
        }
        func row(_ label: String, _ id: JSON?, _ c: JSON) -> [String] {
            [label, c["rx_packets"]?.description ?? "", rate(id, "rx_packets", c),
             c["rx_bytes"]?.description ?? "", rate(id, "rx_bytes", c),
             c["tx_packets"]?.description ?? "", rate(id, "tx_packets", c),
             c["tx_bytes"]?.description ?? "", rate(id, "tx_bytes", c),
             c["rx_errors"]?.description ?? "0", c["tx_errors"]?.description ?? "0", c["dropped"]?.description ?? "0"]
        }
        var rows: [[String]] = (s["queues"]?.array ?? []).map { q in row(q["id"]?.description ?? "", q["id"], q) }
        if let t = s["total"] { rows.append(row("total", nil, t)) }
        return rows
    }
}

extension String {
    var trimmingTrailingSpaces: String {
        var s = self
        while s.last == " " { s.removeLast() }
        return s
    }
}
