import ArgumentParser
import TapJSON

// MARK: - queue

struct Queue: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Add, list, enable (attach), disable (detach) and remove queues.",
        subcommands: [List.self, Add.self, Enable.self, Disable.self, Remove.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A device's queues with their counters.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        func run() throws {
            let r = try connection.call("GET", try devicePath(device) + "/queues")
            connection.show(r) { Table.queues($0["queues"]?.array ?? []) }
        }
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Add queues; each takes the smallest free id.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Option(help: ArgumentHelp("How many, 1 to 256.", valueName: "n")) var count = 1
        func run() throws {
            let r = try connection.call("POST", try devicePath(device) + "/queues", ["count": JSON(count)])
            connection.show(r) { Table.queues($0["queues"]?.array ?? []) }
        }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Attach a queue again (TUNSETQUEUE).")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Argument(help: "The queue id.") var id: Int
        func run() throws {
            let q = try connection.call("PATCH", try devicePath(device) + "/queues/\(id)", ["enabled": true])
            connection.show(q) { Table.queues([$0]) }
        }
    }

    struct Disable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Detach a queue; it keeps its fd, id and counters.")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Argument(help: "The queue id.") var id: Int
        func run() throws {
            let q = try connection.call("PATCH", try devicePath(device) + "/queues/\(id)", ["enabled": false])
            connection.show(q) { Table.queues([$0]) }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a queue (not the last one).")
        @OptionGroup var connection: Connection
        @Argument(help: "The device.") var device: String
        @Argument(help: "The queue id.") var id: Int
        func run() throws {
            _ = try connection.call("DELETE", try devicePath(device) + "/queues/\(id)")
            connection.show(nil) { _ in "" }
        }
    }
}

// MARK: - limits

struct Limits: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show or set the global queue limit.",
                                                    subcommands: [Show.self, Set.self])

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The global limit, queues in use, open files.")
        @OptionGroup var connection: Connection
        func run() throws {
            let l = try connection.call("GET", "/v1/limits")
            connection.show(l) { Table.limits($0) }
        }
    }

    struct Set: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Set the global limit (devices without their own follow it).")
        @OptionGroup var connection: Connection
        @Argument(help: "The new global per-device queue limit, 1 to 256.") var maxQueues: Int
        func run() throws {
            let l = try connection.call("PUT", "/v1/limits", ["max_queues": JSON(maxQueues)])
            connection.show(l) { Table.limits($0) }
        }
    }
}
