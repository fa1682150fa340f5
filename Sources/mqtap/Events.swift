import ArgumentParser
import TapClient
import TapJSON
import TunKit

// MARK: - events

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follow the daemon's events as they happen (Ctrl-C stops).",
        discussion: "Each line: time, id, type, device, then queue, by, lease and changed fields. --json prints the API's lines.")
    @OptionGroup var connection: Connection
    @Option(help: ArgumentHelp("Replay the kept events after this id first.", valueName: "id")) var since: UInt64?
    @Option(help: ArgumentHelp("Only this device's events.", valueName: "name")) var device: String?
    @Flag(help: "Print what is kept and stop instead of following.") var noFollow = false

    func run() throws {
        var query: [String] = []
        if let since { query.append("since=\(since)") }
        if let device { query.append("device=" + APIClient.segment(device)) }
        if noFollow { query.append("follow=false") }
        let path = "/v1/events" + (query.isEmpty ? "" : "?" + query.joined(separator: "&"))
        let client = try connection.client
        let json = connection.json
        let refusal: APIClient.Response?
        var readerGone = false
        do {
            refusal = try client.follow(path) { line in
                guard !line.isEmpty else { return true }  // keep-alive
                let written: Bool
                if json {
                    written = writeStdoutLine(line)
                } else if let e = try? JSON.parse(Array(line.utf8)) {
                    written = writeStdoutLine(Table.event(e))
                } else {
                    written = writeStdoutLine(line)
                }
                if !written { readerGone = true }
                return written
            }
        } catch {
            writeStderrLine("mqtap: \(error)")
            throw ExitCode(3)
        }
        if let r = refusal, let e = r.error {
            writeStderrLine("mqtap: \(e.code): \(e.message)")
            throw ExitCode(1)
        }
        // A followed stream ends only when the daemon ends it (it stopped, or cut a watcher
        // that fell behind) or nobody reads our output any more (`| head`).
        guard !noFollow, !readerGone else { return }
        // Stopping (503 shutting_down) or gone: the daemon went away.
        guard let health = try? client.request("GET", "/v1/health"), health.status == 200 else {
            writeStderrLine("mqtap: the event stream ended: mqtapd went away (stopped or restarting)")
            throw ExitCode(3)
        }
        writeStderrLine("mqtap: mqtapd ended the event stream (a watcher that falls behind is cut; resume with --since)")
        throw ExitCode(1)
    }
}
