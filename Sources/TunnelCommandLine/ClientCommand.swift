import ArgumentParser
import ClientRuntime
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServerRuntime
import ServiceLifecycle
import TunnelConfig
import TunnelCrypto
import TunnelEventLoop
import TunnelRuntime

/// `tunnel-client`: the local end. A SOCKS5 listener on localhost whose streams all travel through one
/// encrypted connection to `tunnel-server`.
public struct TunnelClientCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "tunnel-client",
        abstract: "The local end of the encrypted SOCKS5 tunnel.",
        usage: """
            tunnel-client [<options>]
            tunnel-client keygen --out <path> [--force]
            tunnel-client pubkey --key <path>
            """,
        discussion: """
            Listens on one local port for SOCKS5 (CONNECT and UDP ASSOCIATE), SOCKS4/4a and HTTP proxy requests \
            (CONNECT and plain http:// requests), and carries every stream through one Noise IK \
            connection to tunnel-server, which resolves names and opens the connections. Prints \
            "SOCKS5 listening on HOST:PORT" when ready. Reconnects with backoff when the tunnel drops. \
            With --full-tunnel, every app's traffic goes through the tunnel (a TUN device, routes, DNS; see the \
            README). SIGINT/SIGTERM: stop accepting, let open streams finish (drain_timeout, default 5s), undo \
            any full-tunnel changes, then exit 0.
            """,
        subcommands: [Keygen.self, Pubkey.self, ClientStatus.self]
    )

    @Option(
        name: .long,
        help: ArgumentHelp(
            "The tunnel server: HOST:PORT, or the tunnel://KEY@HOST:PORT link `tunnel-server invite` printed (it names the server's key too). Repeat it for a list: the first that answers is used, the others on failure (README, Several servers). Required unless set in --config.",
            valueName: "host:port|link"
        )
    )
    var server: [String] = []

    @Option(
        name: .customLong("server-key"),
        help: ArgumentHelp(
            "The server's public key (base64, as its keygen/pubkey printed); the client refuses any other server. Required unless set in --config.",
            valueName: "base64"
        )
    )
    var serverKey: String?

    @Option(
        name: .long,
        help: ArgumentHelp("This client's private key file. Required unless set in --config.", valueName: "path")
    )
    var key: String?

    @Option(
        name: .long,
        help: ArgumentHelp("Where to listen for SOCKS5 (default: 127.0.0.1:1080).", valueName: "host:port")
    )
    var socks: String?

    @Option(
        name: .customLong("socks-user"),
        help: ArgumentHelp(
            "Require this username on the local proxy (SOCKS5 username/password, SOCKS4 user id, HTTP Basic). Default: no authentication.",
            valueName: "name"
        )
    )
    var socksUser: String?

    @Option(
        name: .customLong("socks-pass"),
        help: ArgumentHelp(
            "The password that goes with --socks-user. Every user on this machine can read it in ps: prefer --socks-pass-file.",
            valueName: "password"
        )
    )
    var socksPass: String?

    @Option(
        name: .customLong("socks-pass-file"),
        help: ArgumentHelp(
            "Read the password that goes with --socks-user from the first line of this file (keep it mode 0600).",
            valueName: "path"
        )
    )
    var socksPassFile: String?

    @Flag(
        name: .long,
        help:
            "Compress stream data with zlib when the server agrees (default: off; only worth it on slow links, and see the README on what compression can leak)."
    )
    var compress = false

    @Option(
        name: .customLong("fast-open"),
        help: ArgumentHelp(
            "Answer a CONNECT before the server's result and send the first bytes with the open: auto (default) for destinations the server reached in the last minutes, always, or never (README, Fast open).",
            valueName: "auto|always|never"
        )
    )
    var fastOpen: String?

    @Option(
        name: .customLong("event-loop"),
        help: ArgumentHelp(
            "The event loop under the SOCKS port and the tunnel: epoll (our own; the default, except with the full tunnel, which runs on nio) or nio (SwiftNIO's).",
            valueName: "epoll|nio"
        )
    )
    var eventLoop: String?

    @Flag(
        name: .customLong("allow-open-proxy"),
        help: "Allow --socks on a non-loopback address without --socks-user (default: refused)."
    )
    var allowOpenProxy = false

    @Flag(
        name: .customLong("full-tunnel"),
        help:
            "Send all of this machine's IP traffic through the tunnel via a TUN device (needs root or CAP_NET_ADMIN, and tunnel-server --tun). Routes, DNS and firewall changes are undone on exit."
    )
    var fullTunnel = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "With --full-tunnel: keep this network off the tunnel (repeatable; e.g. your LAN).",
            valueName: "cidr"
        )
    )
    var exclude: [String] = []

    @Option(
        name: .long,
        help: ArgumentHelp(
            "With --full-tunnel: the DNS server to use through the tunnel (repeatable). Default: the server's. 'off' leaves /etc/resolv.conf alone (DNS may leak).",
            valueName: "ip|off"
        )
    )
    var dns: [String] = []

    @Flag(
        name: .customLong("kill-switch"),
        help:
            "With --full-tunnel: block all traffic outside the tunnel (except to the server) while the client runs, also while the tunnel is down (needs nftables)."
    )
    var killSwitch = false

    @Option(
        name: .customLong("tun-name"),
        help: ArgumentHelp(
            "With --full-tunnel: the TUN device name ('%d' picks a free number; default tunnel%d).",
            valueName: "name"
        )
    )
    var tunName: String?

    @Flag(
        name: .customLong("recover-only"),
        help:
            "Undo what a --full-tunnel client that was killed or crashed left on this host (routes, resolver, firewall), then exit. Every start does this too."
    )
    var recoverOnly = false

    @OptionGroup var common: CommonOptions

    public init() {}

    /// The settings: defaults, then the config file, then the flags (read again at each SIGHUP).
    func settings() throws -> ClientSettings {
        var settings = ClientSettings()
        if let path = self.common.config {
            var file = try ConfigFile.load(path)
            try settings.apply(file: &file)
        }
        if !self.server.isEmpty {
            settings.servers = try self.server.map { text throws(ConfigError) in
                try ClientSettings.parseServer(text, origin: "--server")
            }
        }
        if let v = self.serverKey {
            guard let key = PublicKey(base64: v) else {
                throw ConfigError("--server-key: '\(v)' is not a base64 X25519 public key")
            }
            settings.serverKey = key
        }
        if let v = self.key { settings.keyPath = v }
        if let v = self.socks { settings.socks = try parseEndpointFlag(v, flag: "--socks") }
        if let v = self.socksUser { settings.socksUser = v }
        if let v = self.socksPass { settings.socksPassword = v }
        if let v = self.socksPassFile {
            settings.socksPassword = try ClientSettings.readPasswordFile(v, origin: "--socks-pass-file")
        }
        if self.allowOpenProxy { settings.allowOpenProxy = true }
        if self.compress { settings.compress = true }
        if let v = self.fastOpen { settings.fastOpen = try ClientSettings.FastOpen.parse(v, origin: "--fast-open") }
        if let v = self.eventLoop {
            settings.eventLoop = try EventLoopKind.parse(v, origin: "--event-loop")
        }
        if self.fullTunnel { settings.fullTunnel.enabled = true }
        if !self.exclude.isEmpty {
            settings.fullTunnel.exclude = try ClientFullTunnelSettings.parseExcludes(self.exclude, origin: "--exclude")
        }
        if !self.dns.isEmpty {
            settings.fullTunnel.dns = try ClientFullTunnelSettings.parseDNS(self.dns, origin: "--dns")
        }
        if self.killSwitch { settings.fullTunnel.killSwitch = true }
        if let v = self.tunName {
            settings.fullTunnel.deviceName = try ServerTUNSettings.parseDeviceName(v, origin: "--tun-name")
        }
        if let v = self.common.logLevel { settings.logLevel = try LogLevelName.validate(v, origin: "--log-level") }
        if let v = self.common.controlSocket { settings.controlSocket = v }
        if let v = self.common.logFormat { settings.logFormat = try LogFormatName.validate(v, origin: "--log-format") }
        if let v = self.common.metrics { settings.metrics = try parseEndpointFlag(v, flag: "--metrics") }
        return settings
    }

    public func run() async throws {
        let settings = try self.settings()
        if self.recoverOnly {
            let logger = bootstrapLogging(level: settings.logLevel, format: settings.logFormat, label: "tunnel-client")
            do {
                try CrashRecovery.recoverOnly(
                    statePath: CrashRecovery.clientStatePath(settings.fullTunnel),
                    program: "tunnel-client --full-tunnel",
                    logger: logger
                )
            } catch {
                throw RuntimeFailure(message: error.description)
            }
            return
        }
        if self.socksPass != nil && self.socksPassFile != nil {
            throw ConfigError("--socks-pass and --socks-pass-file: give one of them")
        }
        let resolved = try settings.resolve()

        let logger = bootstrapLogging(level: settings.logLevel, format: settings.logFormat, label: "tunnel-client")
        if self.socksPass != nil {
            logger.warning(
                "--socks-pass is visible to every user of this machine (ps, /proc); use --socks-pass-file or socks_pass in a config file of mode 0600"
            )
        }
        if resolved.keyFileInsecure {
            logger.warning("\(settings.keyPath ?? "key file") is readable by other users; chmod 600 it")
        }
        // One event loop: the tunnel and every SOCKS connection share it, so streams never cross threads.
        // Our own (README, *Performance*) unless the full tunnel is on or `--event-loop nio` asks for NIO's; NIO's
        // group then runs only the control socket and metrics.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ownLoop: EpollEventLoop?
        switch settings.eventLoop {
        case .nio:
            ownLoop = nil
        case .epoll:
            if settings.fullTunnel.enabled {
                throw ConfigError("--event-loop epoll does not carry the full tunnel yet; use nio")
            }
            ownLoop = try EpollEventLoop(name: "tunnel-client")
        case nil:
            ownLoop = settings.fullTunnel.enabled ? nil : try EpollEventLoop(name: "tunnel-client")
        }
        let client = TunnelClient(
            resolved: resolved,
            eventLoop: ownLoop ?? group.next(),
            logger: logger
        )
        let operations = Operations(
            program: "tunnel-client",
            controlSocket: settings.controlSocket,
            metrics: settings.metrics
        )
        let service = ListenerService(
            readyPrefix: "SOCKS5 listening on",
            failurePrefix: "cannot listen for SOCKS5",
            listen: resolved.settings.socks.description,
            setting: "--socks HOST:PORT (or socks in --config)",
            start: {
                let address = try await client.start()
                try await operations.start(group: group, logger: logger, report: client.report(streams:))
                return address
            },
            stop: {
                await operations.stop()
                await client.shutdown()
            }
        )
        // The parsed flags, read again at each reload: never mutated after parsing (ArgumentParser's property
        // wrappers are not marked Sendable).
        nonisolated(unsafe) let command = self
        try await runUntilSignalled(service, group: group, logger: logger) {
            // What can change while running: the log level and fast open. The rest takes a restart.
            let fresh: ClientSettings
            do {
                fresh = try command.settings()
            } catch {
                logger.error("reload failed: \(error); keeping the settings in use")
                return
            }
            ProcessLogLevel.current = Logger.Level(rawValue: fresh.logLevel) ?? .info
            client.setFastOpen(fresh.fastOpen)
            var unchanged: [String] = []
            if fresh.servers != settings.servers || fresh.serverKey != settings.serverKey { unchanged.append("server") }
            if fresh.socks != settings.socks { unchanged.append("socks") }
            if fresh.keyPath != settings.keyPath { unchanged.append("key") }
            let note = unchanged.isEmpty ? "" : "; \(unchanged.joined(separator: ", ")) changed, which takes a restart"
            logger.notice("reloaded: log level \(fresh.logLevel), fast open \(fresh.fastOpen.rawValue)\(note)")
        }
        if let ownLoop { try? await ownLoop.shutdownGracefully() }
        if let failure = client.failure { throw RuntimeFailure(message: failure) }
    }
}
