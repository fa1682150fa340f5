import TapCore

/// `/metrics` in the Prometheus text format (0.0.4).
enum MetricsResource {
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    static func render(devices: [DeviceInfo], limits: LimitsInfo) -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        family("mqtapd_build_info", "gauge", "Build information; always 1.")
        out += "mqtapd_build_info{version=\"\(Version.current)\"} 1\n"

        let counters: [(String, String, KeyPath<CounterValues, UInt64>)] = [
            ("rx_packets", "Frames the daemon read from the queue (the kernel sent them into the device).", \.rxPackets),
            ("rx_bytes", "Bytes the daemon read from the queue.", \.rxBytes),
            ("tx_packets", "Frames the daemon wrote into the queue.", \.txPackets),
            ("tx_bytes", "Bytes the daemon wrote into the queue.", \.txBytes),
            ("rx_errors", "Failed reads from the queue.", \.rxErrors),
            ("tx_errors", "Failed writes into the queue.", \.txErrors),
            ("dropped", "Frames read from the queue that could not be forwarded to the peer.", \.dropped),
        ]
        for (suffix, help, path) in counters {
            let name = "mqtapd_queue_\(suffix)_total"
            family(name, "counter", help)
            for d in devices {
                for q in d.queues {
                    out += "\(name){device=\"\(d.name)\",queue=\"\(q.id)\"} \(q.counters[keyPath: path])\n"
                }
            }
        }
        let gauges: [(String, String, (DeviceInfo) -> Int)] = [
            ("mqtapd_device_queues", "Queues the device has, detached ones included.", { $0.queueCount }),
            ("mqtapd_device_enabled_queues", "Queues attached to the device.", { $0.enabledQueues }),
            ("mqtapd_device_max_queues", "The device's queue limit.", { $0.maxQueues }),
        ]
        for (name, help, value) in gauges {
            family(name, "gauge", help)
            for d in devices { out += "\(name){device=\"\(d.name)\"} \(value(d))\n" }
        }
        family("mqtapd_max_queues", "gauge", "The global per-device queue limit.")
        out += "mqtapd_max_queues \(limits.maxQueues)\n"
        family("mqtapd_open_files", "gauge", "File descriptors the daemon has open.")
        out += "mqtapd_open_files \(limits.openFiles)\n"
        family("mqtapd_open_files_limit", "gauge", "The daemon's soft RLIMIT_NOFILE.")
        out += "mqtapd_open_files_limit \(limits.openFilesLimit)\n"
        return out
    }

    static func get(_ m: DeviceManager) -> HTTPResponse {
        .text(200, render(devices: m.devices(), limits: m.limits()), contentType: contentType)
    }
}
