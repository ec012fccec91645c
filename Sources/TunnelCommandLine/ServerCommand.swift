import ArgumentParser
import ClientRuntime
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServerRuntime
import ServiceLifecycle
import TunnelConfig
import TunnelEventLoop
import TunnelProtocol
import TunnelRuntime

/// `tunnel-server`: the remote end. Accepts tunnel connections from authorized clients and opens the
/// outbound connections their streams ask for.
public struct TunnelServerCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "tunnel-server",
        abstract: "The remote end of the encrypted SOCKS5 tunnel.",
        usage: """
            tunnel-server [<options>]
            tunnel-server keygen --out <path> [--force]
            tunnel-server pubkey --key <path>
            """,
        discussion: """
            Accepts tunnel connections (Noise IK over TCP) from clients whose public keys are listed in the \
            authorized-keys file, and opens the TCP connections their streams ask for. Prints \
            "tunnel-server listening on HOST:PORT" when ready. \
            SIGINT/SIGTERM: stop accepting, let open \
            streams finish (drain_timeout, default 5s), then exit 0.
            """,
        subcommands: [Keygen.self, Pubkey.self, ServerStatus.self, ServerReload.self, ServerInvite.self]
    )

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Address to accept tunnel connections on; port 0 picks a free one. Required unless set in --config.",
            valueName: "host:port"
        )
    )
    var listen: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Also answer health checks here: a TCP port that accepts, says ok and closes, and stops accepting as soon as the server begins to drain (for a load balancer; the tunnel port stays silent). Default: none.",
            valueName: "host:port"
        )
    )
    var health: String?

    @Option(
        name: .long,
        help: ArgumentHelp("The server's private key file. Required unless set in --config.", valueName: "path")
    )
    var key: String?

    @Option(
        name: .customLong("authorized-keys"),
        help: ArgumentHelp(
            "File of client public keys allowed to connect: one base64 key per line, optional comment after whitespace, '#' lines ignored. Required unless set in --config.",
            valueName: "path"
        )
    )
    var authorizedKeys: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Let clients reach this range although the server denies it by default (loopback, private, link-local and unique-local ranges, the unspecified address, this host's own addresses). Repeatable; adds to allow in --config. Example: --allow 192.168.1.0/24 for a home LAN.",
            valueName: "cidr"
        )
    )
    var allow: [String] = []

    @Option(
        name: .customLong("event-loop"),
        help: ArgumentHelp(
            "The event loops under the tunnel connections and their outbound sockets: epoll (our own, one per core; the default, except with --tun, which runs on nio) or nio (SwiftNIO's).",
            valueName: "epoll|nio"
        )
    )
    var eventLoop: String?

    @Flag(
        name: .long,
        help:
            "Offer full-tunnel mode: a TUN device, an address per client, forwarding and NAT (nftables) to the outside (needs root or CAP_NET_ADMIN)."
    )
    var tun = false

    @Option(
        name: .customLong("tun-pool"),
        help: ArgumentHelp(
            "With --tun: the IPv4 network for clients; the server takes host 1 (default 10.77.0.0/24).",
            valueName: "cidr"
        )
    )
    var tunPool: String?

    @Option(
        name: .customLong("tun-pool6"),
        help: ArgumentHelp(
            "With --tun: the IPv6 network for clients: auto (a unique local /64 derived from the server key; the default), none (clients block IPv6), or a CIDR.",
            valueName: "auto|none|cidr"
        )
    )
    var tunPool6: String?

    @Option(
        name: .customLong("tun-mtu"),
        help: ArgumentHelp("With --tun: MTU of the TUN devices at both ends (default 1420).", valueName: "bytes")
    )
    var tunMTU: Int?

    @Option(
        name: .customLong("tun-dns"),
        help: ArgumentHelp(
            "With --tun: DNS server to tell clients (repeatable). Default: the server's own forwarder on its pool address, which asks this host's resolvers.",
            valueName: "ip"
        )
    )
    var tunDNS: [String] = []

    @Option(
        name: .customLong("tun-name"),
        help: ArgumentHelp(
            "With --tun: the TUN device name ('%d' picks a free number; default tunnel%d).",
            valueName: "name"
        )
    )
    var tunName: String?

    @Flag(
        name: .customLong("recover-only"),
        help:
            "Undo what a --tun server on the same --listen address that was killed or crashed left on this host (firewall table, forwarding), then exit. Every start with --tun does this too."
    )
    var recoverOnly = false

    @OptionGroup var common: CommonOptions

    public init() {}

    /// The settings: defaults, then the config file, then the flags (read again at each SIGHUP).
    func settings() throws -> ServerSettings {
        var settings = ServerSettings()
        if let path = self.common.config {
            var file = try ConfigFile.load(path)
            try settings.apply(file: &file)
        }
        if let v = self.listen { settings.listen = try parseEndpointFlag(v, flag: "--listen") }
        if let v = self.health { settings.health = try parseEndpointFlag(v, flag: "--health") }
        if let v = self.key { settings.keyPath = v }
        if let v = self.authorizedKeys { settings.authorizedKeysPath = v }
        if let v = self.common.logLevel { settings.logLevel = try LogLevelName.validate(v, origin: "--log-level") }
        if let v = self.common.controlSocket { settings.controlSocket = v }
        if let v = self.common.logFormat { settings.logFormat = try LogFormatName.validate(v, origin: "--log-format") }
        if let v = self.common.metrics { settings.metrics = try parseEndpointFlag(v, flag: "--metrics") }
        settings.allow += try CIDR.parseList(self.allow, origin: "--allow")
        if self.tun { settings.tun.enabled = true }
        if let v = self.eventLoop { settings.eventLoop = try EventLoopKind.parse(v, origin: "--event-loop") }
        if let v = self.tunPool { settings.tun.pool = try ServerTUNSettings.parsePool(v, origin: "--tun-pool") }
        if let v = self.tunPool6 { settings.tun.pool6 = try ServerTUNSettings.parsePool6(v, origin: "--tun-pool6") }
        if let v = self.tunMTU {
            guard TunnelAssignment.mtuRange.contains(v) else {
                throw ConfigError(
                    "--tun-mtu: \(v) is out of range (\(TunnelAssignment.mtuRange.lowerBound)...\(TunnelAssignment.mtuRange.upperBound))"
                )
            }
            settings.tun.mtu = v
        }
        if !self.tunDNS.isEmpty {
            settings.tun.dns = try ServerTUNSettings.parseAddresses(self.tunDNS, origin: "--tun-dns")
        }
        if let v = self.tunName {
            settings.tun.deviceName = try ServerTUNSettings.parseDeviceName(v, origin: "--tun-name")
        }
        return settings
    }

    public func run() async throws {
        let settings = try self.settings()
        if self.recoverOnly {
            guard let listen = settings.listen else {
                throw ConfigError(
                    "--recover-only needs the --listen HOST:PORT of the server to recover (its journal is kept per address), or state_file in --config"
                )
            }
            let logger = bootstrapLogging(level: settings.logLevel, format: settings.logFormat, label: "tunnel-server")
            do {
                try CrashRecovery.recoverOnly(
                    statePath: CrashRecovery.serverStatePath(settings.tun, listen: listen),
                    program: "tunnel-server --tun",
                    logger: logger
                )
            } catch {
                throw RuntimeFailure(message: error.description)
            }
            return
        }
        let resolved = try settings.resolve()

        let logger = bootstrapLogging(level: settings.logLevel, format: settings.logFormat, label: "tunnel-server")
        if resolved.keyFileInsecure {
            logger.warning("\(settings.keyPath ?? "key file") is readable by other users; chmod 600 it")
        }
        if resolved.authorizedKeys.entries.isEmpty {
            logger.warning("the authorized keys file lists no keys: no client can connect")
        }
        // Our own loops, one per core, carry the tunnel connections and their sockets (README, *Performance*);
        // NIO's group then runs only health checks, the control socket and metrics. With --tun (its device and
        // DNS are NIOPosix channels) or `--event-loop nio`, NIO's group carries everything.
        let ownLoops: EpollEventLoopGroup?
        switch settings.eventLoop {
        case .nio:
            ownLoops = nil
        case .epoll:
            if settings.tun.enabled {
                throw ConfigError("--event-loop epoll does not carry the full tunnel (--tun) yet; use nio")
            }
            ownLoops = try EpollEventLoopGroup(count: System.coreCount, name: "tunnel-server")
        case nil:
            ownLoops =
                settings.tun.enabled ? nil : try EpollEventLoopGroup(count: System.coreCount, name: "tunnel-server")
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: ownLoops == nil ? System.coreCount : 1)
        let server = TunnelServer(resolved: resolved, group: group, sessionLoops: ownLoops, logger: logger)
        let operations = Operations(
            program: "tunnel-server",
            controlSocket: settings.controlSocket,
            metrics: settings.metrics
        )
        let service = ListenerService(
            readyPrefix: "tunnel-server listening on",
            failurePrefix: "cannot listen",
            listen: resolved.listen.description,
            setting: "--listen HOST:PORT (or listen in --config)",
            start: {
                let address = try await server.start()
                try await operations.start(group: group, logger: logger, report: server.report(streams:)) {
                    request in request == "reload" ? Control.reloadAnswer(server.reload()) : nil
                }
                if let health = settings.health {
                    do {
                        let bound = try await server.startHealthCheck(on: health)
                        logger.info("health checks answered on \(formatBound(bound))")
                    } catch {
                        throw RuntimeFailure(message: "cannot listen for health checks on \(health): \(error)")
                    }
                }
                return address
            },
            stop: {
                await operations.stop()
                await server.shutdown()
            }
        )
        // The parsed flags, read again at each reload: never mutated after parsing (ArgumentParser's property
        // wrappers are not marked Sendable).
        nonisolated(unsafe) let command = self
        try await runUntilSignalled(service, group: group, logger: logger) {
            // The authorized keys (README, Reload), and the log level from the config.
            if let fresh = try? command.settings() {
                ProcessLogLevel.current = Logger.Level(rawValue: fresh.logLevel) ?? .info
            }
            _ = server.reload()
        }
        if let ownLoops { try? await ownLoops.shutdownGracefully() }
    }
}
