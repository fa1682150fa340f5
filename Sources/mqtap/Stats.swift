import ArgumentParser
import TapJSON
import TunKit

// MARK: - stats

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per-queue counters; --watch refreshes them with packet and byte rates.",
        discussion: """
            rx counts the frames the daemon read from a queue: what the kernel sent into the device (so the \
            total rx is the kernel's tx_packets). tx counts the frames written into a queue: what the kernel \
            received from the device. Off a terminal, --watch prints the header once, then one line per \
            queue and one for the total per sample, each starting with the sample's time (RFC 3339).
            """)
    @OptionGroup var connection: Connection
    @Argument var device: String
    @Flag(help: "Refresh every --interval seconds, with packet and byte rates.") var watch = false
    @Option(help: "Seconds between refreshes.") var interval = 1.0
    @Option(help: "Stop after this many refreshes (default: until interrupted).") var count: Int?

    func validate() throws {
        guard interval >= 0.1 else { throw ValidationError("--interval must be at least 0.1") }
    }

    func run() throws {
        var previous: (JSON, Double)?
        var n = 0
        repeat {
            let s = try connection.call("GET", try devicePath(device) + "/stats") ?? .null
            let now = Double(Clock.monotonicNanoseconds()) / 1e9
            if connection.json {
                writeStdoutLine(s.text)
            } else if watch && !isTerminal(1) {
                // In a pipe or a file, as vmstat -t and sar do: the legend and header once,
                // then one line per queue and the total per sample, each with its time,
                // written at once (nothing waits in a buffer).
                if n == 0 { writeStdoutLine(Table.statsLegend + "\n" + Table.statsLineHeader) }
                for line in Table.statsLines(s, previous: previous.map { ($0.0, now - $0.1) }, time: Clock.timestamp()) {
                    writeStdoutLine(line)
                }
            } else {
                let table = Table.stats(s, previous: previous.map { ($0.0, now - $0.1) })
                // On a terminal the table is redrawn in place.
                if watch {
                    writeStdoutLine("\u{1B}[H\u{1B}[2J" + table)
                } else {
                    writeStdoutLine(table)
                }
            }
            previous = (s, now)
            n += 1
            if watch, count.map({ n < $0 }) ?? true { Clock.sleep(interval) }
        } while watch && count.map({ n < $0 }) ?? true
    }
}
