// swift-tools-version:6.1
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    // Release builds skip the run-time exclusivity checks (a few percent of every packet's CPU: a TLS
    // lookup per access); debug builds, which the unit tests run, keep them and would catch a violation.
    // Cross-module optimization lets the handlers inline and specialise the core's code (records, frames,
    // the cipher) instead of calling across module boundaries on every packet.
    .unsafeFlags(["-enforce-exclusivity=unchecked", "-cross-module-optimization"], .when(configuration: .release)),
    // Each function in a section of its own, so that the link can pack the packet path together (below).
    .unsafeFlags(["-Xfrontend", "-function-sections"], .when(platforms: [.linux], configuration: .release)),
]

let packageDirectory = String(#filePath.dropLast("/Package.swift".count))

/// The two programs carry the Swift runtime inside them: they run on a host without a Swift toolchain (copy
/// the binary; the host needs libsodium, zlib and libstdc++), and the runtime's calls on the packet path are
/// direct, with no PLT hop or dynamic TLS lookup per retain or exclusivity check (about 25 us less per
/// full-tunnel ping). ArgumentParser imports FoundationEssentials and is compiled without -static-stdlib, so
/// the static archive's two shim libraries are named here. (Importing all of Foundation would not link.)
///
/// The release link (lld, from the Swift toolchain) puts the functions of the packet path side by side, in the
/// order of `hot-functions.order` (written by `Tests/profile-hot-functions.sh`). A packet that wakes a program
/// after an idle spell then touches about 25 pages of code rather than about 100 spread over 12 MB: about
/// 40 us off a full-tunnel ping. The dependencies' functions get sections of their own only when the build
/// passes `-Xswiftc -Xfrontend -Xswiftc -function-sections` (README); without it the list orders our code and
/// the runtime, and the build still works. A name missing from the list is only left where it falls.
let programLinkerSettings: [LinkerSetting] = [
    .unsafeFlags(["-static-stdlib", "-l_FoundationCShims", "-l_FoundationCollections"], .when(platforms: [.linux])),
    .unsafeFlags(
        [
            "-use-ld=lld",
            "-Xlinker", "--symbol-ordering-file=\(packageDirectory)/Sources/TunnelCommandLine/hot-functions.order",
            "-Xlinker", "--no-warn-symbol-ordering",
        ],
        .when(platforms: [.linux], configuration: .release)
    ),
]

/// What the runtime modules (shared, client side, server side) build on.
let runtimeDependencies: [Target.Dependency] = [
    "CTUN",
    "TunnelEventLoop",
    "TunnelTransport",
    "TunnelConfig",
    "TunnelTUN",
    "LocalProxy",
    .product(name: "NIOCore", package: "swift-nio"),
    .product(name: "NIOPosix", package: "swift-nio"),
    .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
    .product(name: "Logging", package: "swift-log"),
    .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
    .product(name: "Metrics", package: "swift-metrics"),
]

let package = Package(
    name: "tunnel",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "tunnel-server", targets: ["tunnel-server"]),
        .executable(name: "tunnel-client", targets: ["tunnel-client"]),
        .executable(name: "tunnel-bench", targets: ["tunnel-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // MARK: - C libraries from the system (Debian: libsodium-dev, zlib1g-dev)
        .systemLibrary(
            name: "CSodium",
            path: "Sources/CSodium",
            pkgConfig: "libsodium",
            providers: [.apt(["libsodium-dev"]), .brew(["libsodium"])]
        ),
        .systemLibrary(
            name: "CZlib",
            path: "Sources/CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),

        /// TUNSETIFF is a function-like macro Swift cannot import: a few lines of C open the device.
        .target(name: "CTUN", path: "Sources/CTUN"),
        /// `tunnel-server invite`'s QR code: libqrencode's header at build time (Debian: libqrencode-dev), the
        /// library itself loaded only when a code is drawn (the programs do not depend on it).
        /// epoll and eventfd for our own event loop: Swift cannot import <sys/epoll.h>'s packed event.
        .target(name: "CEpoll", path: "Sources/CEpoll"),
        .target(name: "CQRCode", path: "Sources/CQRCode", linkerSettings: [.linkedLibrary("dl")]),

        // MARK: - Pure, I/O-free core
        .target(
            name: "TunnelCrypto",
            dependencies: ["CSodium"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "TunnelCompression",
            dependencies: ["CZlib", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "TunnelProtocol",
            dependencies: [
                "TunnelCrypto",
                "TunnelCompression",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "LocalProxy",
            dependencies: [
                "TunnelProtocol",
                "TunnelCrypto",
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "TunnelConfig",
            dependencies: ["TunnelCrypto", "TunnelProtocol"],
            swiftSettings: swiftSettings
        ),

        /// Full-tunnel mode's host side: the TUN device, packet header fields, the address pool, and the
        /// journalled host changes (routes, resolver, nftables). No NIOPosix.
        .target(
            name: "TunnelTUN",
            dependencies: ["CTUN", "TunnelProtocol", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),

        // MARK: - SwiftNIO handlers around the core, and the runtime that wires sockets
        .target(
            name: "TunnelTransport",
            dependencies: [
                "TunnelProtocol",
                "LocalProxy",
                "TunnelEventLoop",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        /// An event loop of our own (epoll) under NIOCore's pipelines: the same handlers, without NIOPosix's
        /// per-connection cost (README, *Performance*).
        .target(
            name: "TunnelEventLoop",
            dependencies: [
                "CEpoll",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: swiftSettings
        ),
        // What both programs run: socket settings, the crash journal's takeover, name resolution, the
        // control socket and the metrics endpoint.
        .target(
            name: "TunnelRuntime",
            dependencies: runtimeDependencies + [
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        // tunnel-client's side: the tunnel manager and reconnects, the UDP relay, full-tunnel mode.
        .target(
            name: "ClientRuntime",
            dependencies: ["TunnelRuntime"] + runtimeDependencies,
            swiftSettings: swiftSettings
        ),
        // tunnel-server's side: sessions, outbound connections, UDP associations, the TUN device, DNS.
        .target(
            name: "ServerRuntime",
            dependencies: ["TunnelRuntime"] + runtimeDependencies,
            swiftSettings: swiftSettings
        ),
        .target(
            name: "TunnelCommandLine",
            dependencies: [
                "TunnelRuntime",
                "TunnelEventLoop",
                "ClientRuntime",
                "ServerRuntime",
                "TunnelConfig",
                "TunnelProtocol",
                "CQRCode",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            exclude: ["hot-functions.order"],
            swiftSettings: swiftSettings
        ),

        // MARK: - Thin executables
        .executableTarget(
            name: "tunnel-server",
            dependencies: ["TunnelCommandLine"],
            swiftSettings: swiftSettings,
            linkerSettings: programLinkerSettings
        ),
        .executableTarget(
            name: "tunnel-client",
            dependencies: ["TunnelCommandLine"],
            swiftSettings: swiftSettings,
            linkerSettings: programLinkerSettings
        ),
        /// The project's benchmark: measures any SOCKS5 port, or starts our own tunnel (see README).
        .executableTarget(name: "tunnel-bench", swiftSettings: swiftSettings),

        // MARK: - Tests
        .testTarget(name: "TunnelCryptoTests", dependencies: ["TunnelCrypto"], resources: [.copy("Fixtures")]),
        // Helpers the test targets share (test data, doubles), so none is copied between them.
        .target(
            name: "TunnelTestSupport",
            dependencies: ["TunnelTUN", .product(name: "NIOCore", package: "swift-nio")],
            path: "Tests/TunnelTestSupport"
        ),
        .testTarget(
            name: "TunnelCompressionTests",
            dependencies: ["TunnelCompression", "TunnelTestSupport", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "TunnelProtocolTests",
            dependencies: ["TunnelProtocol", "TunnelTestSupport", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "LocalProxyTests",
            dependencies: ["LocalProxy", "TunnelProtocol", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "TunnelTUNTests",
            dependencies: [
                "TunnelTUN", "TunnelProtocol", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(name: "TunnelConfigTests", dependencies: ["TunnelConfig", "TunnelProtocol", "TunnelCrypto"]),
        .testTarget(
            name: "ClientRuntimeTests",
            dependencies: [
                "ClientRuntime", "TunnelConfig", "TunnelProtocol", "TunnelRuntime", "TunnelTUN", "TunnelTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "ServerRuntimeTests",
            dependencies: [
                "ServerRuntime", "TunnelConfig", "TunnelProtocol", "TunnelTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "TunnelEventLoopTests",
            dependencies: [
                "TunnelEventLoop", "TunnelTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "TunnelTransportTests",
            dependencies: [
                "TunnelTransport",
                "LocalProxy",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
    ]
)
