import LocalProxy
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TunnelConfig
import TunnelEventLoop
import TunnelProtocol
import TunnelRuntime
import TunnelTransport

#if canImport(Glibc)
import Glibc
#endif

/// `tunnel-client`: the local SOCKS5 listener and the tunnel manager, all on one event loop.
public final class TunnelClient: Sendable {
    private let resolved: ClientSettings.Resolved
    private let eventLoop: any EventLoop
    private let logger: Logger
    private let manager: NIOLoopBoundBox<ClientTunnelManager>
    private let listener = NIOLockedValueBoxChannel()
    private let ownListener = NIOLockedValueBox<EpollListener?>(nil)
    private let fatalMessage = NIOLockedValueBox<String?>(nil)
    private let hasFullTunnel = NIOLockedValueBox(false)

    /// Why the client stopped on its own (it raised SIGTERM to shut down gracefully), if it did.
    public var failure: String? { self.fatalMessage.withLockedValue { $0 } }

    public init(resolved: ClientSettings.Resolved, eventLoop: any EventLoop, logger: Logger) {
        self.resolved = resolved
        self.eventLoop = eventLoop
        self.logger = logger
        self.manager = NIOLoopBoundBox.makeBoxSendingValue(
            ClientTunnelManager(eventLoop: eventLoop, resolved: resolved, logger: logger),
            eventLoop: eventLoop
        )
    }

    /// What `tunnel-client status` shows (README, *Operating it*).
    public func report(streams: Bool) -> EventLoopFuture<ClientReport> {
        let manager = self.manager
        return self.eventLoop.submit { manager.value.report(streams: streams) }
    }

    /// Fast open from now on (a reload).
    public func setFastOpen(_ mode: ClientSettings.FastOpen) {
        let manager = self.manager
        self.eventLoop.execute { manager.value.fastOpenMode = mode }
    }

    /// Longest the SOCKS port waits for the first attempt to finish.
    static let firstAttemptWait: TimeAmount = .seconds(3)

    /// Starts the tunnel and binds the SOCKS listener; returns the bound SOCKS address.
    public func start() async throws -> SocketAddress {
        let manager = self.manager
        var proxyConfiguration = LocalProxyHandler.Configuration()
        if let user = self.resolved.settings.socksUser, let pass = self.resolved.settings.socksPassword {
            proxyConfiguration.credentials = ProxyCredentials(username: user, password: pass)
        }
        if self.resolved.settings.udp {
            proxyConfiguration.udpRelay = ClientUDPRelay(
                manager: manager,
                idleTimeout: .nanoseconds(self.resolved.settings.udpIdleTimeout)
            )
        }
        let configuration = proxyConfiguration
        if self.resolved.settings.fullTunnel.enabled {
            try await self.prepareFullTunnel()
        }
        // The SOCKS port opens once the first attempt has brought the tunnel up (as `ssh -D` opens its port
        // after logging in), so an application that finds the port open is served at once instead of
        // waiting for the handshake; after a failed attempt, or `firstAttemptWait`, it opens anyway and
        // requests wait for the tunnel (bounded) as they do during a reconnect.
        let firstAttempt = self.eventLoop.makePromise(of: Void.self)
        self.eventLoop.execute {
            let isolated = self.eventLoop.assumeIsolated()
            let cap = isolated.scheduleTask(in: Self.firstAttemptWait) { manager.value.onFirstAttempt?() }
            manager.value.onFirstAttempt = {
                cap.cancel()
                firstAttempt.succeed()
            }
            manager.value.start()
        }
        try? await firstAttempt.futureResult.get()
        let address: SocketAddress
        do {
            if let loop = self.eventLoop as? EpollEventLoop {
                let listener = try await self.bind(configuration: configuration, on: loop)
                self.ownListener.withLockedValue { $0 = listener }
                address = listener.localAddress
            } else {
                let channel = try await self.bind(configuration: configuration)
                self.listener.set(channel)
                guard let bound = channel.localAddress else { throw ChannelError.unknownLocalAddress }
                address = bound
            }
        } catch {
            try? await self.eventLoop.flatSubmit { manager.value.shutdown(drainTimeout: .zero) }.get()
            if self.hasFullTunnel.withLockedValue({ $0 }) {
                try? await self.eventLoop.submit { manager.value.fullTunnel?.shutdown() }.get()
            }
            throw error
        }
        return address
    }

    /// The SOCKS listener on our own event loop: the same handlers, on `EpollStreamChannel`s.
    private func bind(
        configuration: LocalProxyHandler.Configuration,
        on loop: EpollEventLoop
    ) async throws
        -> EpollListener
    {
        let manager = self.manager
        let logger = self.logger
        return try await EpollListener.bind(
            host: self.resolved.settings.socks.host,
            port: self.resolved.settings.socks.port,
            on: loop
        ) { channel in
            try StreamSocket.configure(channel)
            try channel.pipeline.syncOperations.addHandler(
                LocalProxyHandler(provider: manager.value, configuration: configuration, logger: logger)
            )
        }
    }

    private func bind(configuration: LocalProxyHandler.Configuration) async throws -> any Channel {
        let manager = self.manager
        let logger = self.logger
        return try await ServerBootstrap(group: self.eventLoop)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try StreamSocket.configure(channel)
                    try channel.pipeline.syncOperations.addHandler(
                        LocalProxyHandler(provider: manager.value, configuration: configuration, logger: logger)
                    )
                }
            }
            .bind(host: self.resolved.settings.socks.host, port: self.resolved.settings.socks.port)
            .get()
    }

    /// Full tunnel: pins the server's address, prepares the host (device, kill switch) and hands it to the
    /// manager, which brings it up at the first assignment.
    private func prepareFullTunnel() async throws {
        let server = self.resolved.server
        guard let address = IPAddress.parse(server.host) ?? resolveHost(server.host) else {
            throw ClientFullTunnel.SetupError(description: "cannot resolve the server \(server.host)")
        }
        let manager = self.manager
        let settings = self.resolved.settings.fullTunnel
        let logger = self.logger
        let fatalMessage = self.fatalMessage
        let loop = self.eventLoop
        try await self.eventLoop.submit {
            let fullTunnel = try ClientFullTunnel(
                eventLoop: loop,
                settings: settings,
                server: address,
                port: server.port,
                logger: logger
            )
            manager.value.fullTunnel = fullTunnel
            manager.value.connectHost = address.description
            manager.value.onFatal = { message in
                fatalMessage.withLockedValue { $0 = message }
                // Shut down the normal way (undoing every host change) and exit with an error.
                kill(getpid(), SIGTERM)
            }
        }.get()
        self.hasFullTunnel.withLockedValue { $0 = true }
    }

    /// Graceful shutdown: stop accepting SOCKS connections, let streams drain, CLOSE the tunnel, and undo the
    /// full tunnel's host changes.
    public func shutdown() async {
        if let channel = self.listener.take() { try? await channel.close() }
        if let listener = self.ownListener.withLockedValue({ $0 }) { await listener.close() }
        let timeout = TimeAmount.nanoseconds(self.resolved.settings.timings.drainTimeout)
        let manager = self.manager
        let done = self.eventLoop.flatSubmit { manager.value.shutdown(drainTimeout: timeout) }
        try? await done.get()
        if self.hasFullTunnel.withLockedValue({ $0 }) {
            try? await self.eventLoop.submit { manager.value.fullTunnel?.shutdown() }.get()
        }
    }
}

/// Resolves a host name to its first address (blocking; once, at start).
func resolveHost(_ host: String) -> IPAddress? {
    guard case .success(let addresses) = NameResolution.addresses(of: host, port: 0) else { return nil }
    return addresses.first?.unmappedBytes.flatMap { IPAddress(bytes: $0) }
}
