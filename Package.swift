// swift-tools-version:6.0
import PackageDescription

// Dependencies point one way: mqtapd → TapAPI → TapCore → TunKit → CTunLinux (TapJSON
// is a leaf both TapAPI and TapCore use).
// External packages: swift-argument-parser (flags) and swift-log (the logging API).
let package = Package(
    name: "mqtapd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "mqtapd", targets: ["mqtapd"]),
        .executable(name: "mqtap", targets: ["mqtap"]),
        .executable(name: "mqtap-cni", targets: ["mqtap-cni"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // Logging API; the daemon's one handler writes logfmt or JSON lines.
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // System libraries: module maps plus static-inline shims for the variadic and macro APIs.
        .systemLibrary(
            name: "CMicroHTTPD", pkgConfig: "libmicrohttpd",
            providers: [.apt(["libmicrohttpd-dev"])]),
        .systemLibrary(
            name: "CJansson", pkgConfig: "jansson",
            providers: [.apt(["libjansson-dev"])]),
        // Kernel constants Swift cannot import (_IOW macros) and the non-variadic ioctl entry.
        .target(name: "CTunLinux"),
        // Per-queue counter block: one cache line, single-writer relaxed atomics.
        .target(name: "CCounters"),
        // The syscall layer: the only code that calls open/ioctl/read/write/epoll. What only one
        // client or the daemon uses lives in that target (the client socket in TapClient, exec in
        // mqtap, spawning in mqtap-cni, signals and systemd in mqtapd).
        .target(name: "TunKit", dependencies: ["CTunLinux"]),
        // The JSON value type: the only importer of jansson (the API's bodies, the state file).
        .target(name: "TapJSON", dependencies: ["CJansson"]),
        // The one version string, for the daemon and the CLI.
        .target(name: "MQTVersion"),
        // Device manager, worker pool, counters, state file. No Glibc, no ioctl.
        .target(name: "TapCore", dependencies: ["TunKit", "CCounters", "TapJSON", .product(name: "Logging", package: "swift-log")]),
        // HTTP: the only importer of libmicrohttpd; router and resources.
        .target(name: "TapAPI", dependencies: ["TapCore", "TapJSON", "CMicroHTTPD", "MQTVersion"],
                // The served spec, built in from the repository's one openapi.yaml (a link to it).
                resources: [.embedInCode("openapi.yaml")]),
        // The client side: HTTP/1.1 over the Unix socket or TCP, for the CLI.
        .target(name: "TapClient", dependencies: ["TapJSON", "TunKit"]),
        .executableTarget(
            name: "mqtap",
            dependencies: ["TapClient", "TapJSON", "TunKit", "CTunLinux", "MQTVersion",
                           .product(name: "ArgumentParser", package: "swift-argument-parser")]),
        // The CNI plugin: a container runtime runs it to get a tap from the daemon.
        .executableTarget(name: "mqtap-cni", dependencies: ["TapClient", "TapJSON", "TunKit", "CTunLinux"]),
        .executableTarget(
            name: "mqtapd",
            dependencies: [
                "TapAPI", "TapCore", "TapJSON", "TunKit", "MQTVersion",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Test helpers (frame generator, `ip` runner, privilege gate); never linked into mqtapd.
        .target(name: "TapTestSupport", dependencies: ["TapCore", "TunKit", "CTunLinux"]),
        .testTarget(name: "TapCoreTests", dependencies: ["TapCore", "TunKit", "TapJSON", "TapTestSupport",
                                                      .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "TapAPITests", dependencies: ["TapAPI", "TapCore", "TapJSON", "TapClient", "TapTestSupport", "MQTVersion"]),
        .testTarget(name: "TapPrivilegedTests", dependencies: ["TapCore", "TunKit", "TapTestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
