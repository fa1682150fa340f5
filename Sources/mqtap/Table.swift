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
        render(["NAME", "TYPE", "QUEUES", "ENABLED", "MAX", "MODE", "UP", "MTU", "STATE"], list.map { d in
            // forward shows its peer, and whether it is there: forward>b, forward>b(missing).
            var mode = d["mode"]?.string ?? ""
            if let peer = d["peer"]?.string {
                mode += ">" + peer + (d["peer_state"]?.string == "missing" ? "(missing)" : "")
            }
            return [d["name"]?.string ?? "", d["type"]?.string ?? "", d["queue_count"]?.description ?? "",
             d["enabled_queues"]?.description ?? "", d["max_queues"]?.description ?? "", mode,
             d["up"]?.description ?? "", d["mtu"]?.description ?? "", d["state"]?.string ?? ""]
        })
    }

    static func device(_ d: JSON) -> String {
        var out = devices([d])
        if let reason = d["state_reason"]?.string { out += "\nreason: \(reason)" }
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
    static func stats(_ s: JSON, previous: (JSON, Double)?) -> String {
        func rate(_ id: JSON?, _ key: String, _ now: JSON) -> String {
            guard let (old, dt) = previous, dt > 0 else { return "-" }
            let before = (old["queues"]?.array ?? []).first { $0["id"] == id }?[key]?.int
                ?? (id == nil ? old["total"]?[key]?.int : nil)
            guard let before, let after = now[key]?.int else { return "-" }
            return String(Int((Double(after - before) / dt).rounded()))
        }
        var rows: [[String]] = (s["queues"]?.array ?? []).map { q in
            [q["id"]?.description ?? "", q["rx_packets"]?.description ?? "", rate(q["id"], "rx_packets", q),
             q["rx_bytes"]?.description ?? "", q["tx_packets"]?.description ?? "", rate(q["id"], "tx_packets", q),
             String((q["rx_errors"]?.int ?? 0) + (q["tx_errors"]?.int ?? 0))]
        }
        if let t = s["total"] {
            rows.append(["total", t["rx_packets"]?.description ?? "", rate(nil, "rx_packets", t),
                         t["rx_bytes"]?.description ?? "", t["tx_packets"]?.description ?? "", rate(nil, "tx_packets", t),
                         String((t["rx_errors"]?.int ?? 0) + (t["tx_errors"]?.int ?? 0))])
        }
        var out = render(["QUEUE", "RX_PACKETS", "RX_PPS", "RX_BYTES", "TX_PACKETS", "TX_PPS", "ERRORS"], rows)
        if let k = s["kernel"] {
            out += "\nkernel: tx_packets \(k["tx_packets"]?.description ?? "?")  tx_dropped \(k["tx_dropped"]?.description ?? "?")"
                + "  rx_packets \(k["rx_packets"]?.description ?? "?")"
        }
        return out
    }
}

extension String {
    var trimmingTrailingSpaces: String {
        var s = self
        while s.last == " " { s.removeLast() }
        return s
    }
}
