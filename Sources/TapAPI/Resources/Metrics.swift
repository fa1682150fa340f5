import MQTVersion
import TapCore
import TunKit

/// `/metrics` in the Prometheus text format (0.0.4).
enum MetricsResource {
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    static func render(devices: [DeviceInfo], kernel: [String: [String: UInt64]], limits: LimitsInfo,
                       usage: ProcessResources.Usage?) -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        family("mqtapd_build_info", "gauge", "Build information; always 1.")
        out += "mqtapd_build_info{version=\"\(Version.current)\"} 1\n"

        // rx and tx from the queue fd's side: rx is what the daemon read from a queue, which
        // the kernel sent into the device.
        let counters: [(String, String, KeyPath<CounterValues, UInt64>)] = [
            ("rx_packets", "Frames the daemon read from the queue: what the kernel sent into the device (its tx).", \.rxPackets),
            ("rx_bytes", "Bytes the daemon read from the queue (without a vnet header).", \.rxBytes),
            ("tx_packets", "Frames written into the queue (echoed, or forwarded by a peer): what the kernel received from the device (its rx).", \.txPackets),
            ("tx_bytes", "Bytes written into the queue (without a vnet header).", \.txBytes),
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
        // The kernel's own counters of each device, as the stats API has them.
        for key in Link.statisticsKeys {
            let name = "mqtapd_device_kernel_\(key)_total"
            let direction = key.hasPrefix("tx") ? "sent into the device (the daemon reads them from its queues)"
                : "received from the device (written into its queues)"
            family(name, "counter", "The kernel's \(key) of the device: \(direction).")
            for d in devices {
                if let v = kernel[d.name]?[key] { out += "\(name){device=\"\(d.name)\"} \(v)\n" }
            }
        }
        family("mqtapd_device_info", "gauge", "One per device known; state is active, conflict or failed.")
        for d in devices {
            out += "mqtapd_device_info{device=\"\(d.name)\",state=\"\(d.status.name)\",type=\"\(d.kind.rawValue)\","
                + "persist=\"\(d.persist)\",mode=\"\(d.mode.rawValue)\"} 1\n"
        }
        let gauges: [(String, String, (DeviceInfo) -> Int)] = [
            ("mqtapd_device_queues", "Queues the device has, detached ones included.", { $0.queueCount }),
            ("mqtapd_device_enabled_queues", "Queues attached to the device.", { $0.enabledQueues }),
            ("mqtapd_device_max_queues", "The device's queue limit.", { $0.maxQueues }),
            ("mqtapd_device_foreign_queues", "Queues other processes attached to the device by name.",
             { $0.kernel?.foreignQueues ?? 0 }),
        ]
        for (name, help, value) in gauges {
            family(name, "gauge", help)
            for d in devices { out += "\(name){device=\"\(d.name)\"} \(value(d))\n" }
        }
        family("mqtapd_max_queues", "gauge", "The global per-device queue limit.")
        out += "mqtapd_max_queues \(limits.maxQueues)\n"
        // The standard process metrics, as client libraries export them.
        family("process_open_fds", "gauge", "Number of open file descriptors.")
        out += "process_open_fds \(limits.openFiles)\n"
        family("process_max_fds", "gauge", "Maximum number of open file descriptors.")
        out += "process_max_fds \(limits.openFilesLimit)\n"
        if let u = usage {
            family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
            out += "process_cpu_seconds_total \(u.cpuSeconds)\n"
            family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
            out += "process_resident_memory_bytes \(u.residentBytes)\n"
            family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
            out += "process_virtual_memory_bytes \(u.virtualBytes)\n"
            family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
            out += "process_start_time_seconds \(u.startTime)\n"
        }
        return out
    }

    static func get(_ m: DeviceManager) -> HTTPResponse {
        // Each device is read from the kernel once: its view carries the link's counters.
        let devices = m.devices()
        var kernel: [String: [String: UInt64]] = [:]
        for d in devices { if let k = d.kernelStatistics { kernel[d.name] = k } }
        return .text(200, render(devices: devices, kernel: kernel, limits: m.limits(), usage: ProcessResources.usage()),
                     contentType: contentType)
    }
}
