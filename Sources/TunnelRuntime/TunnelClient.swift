import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import LocalProxy
import TunnelConfig
import TunnelTransport

/// `tunnel-client`: the local SOCKS5 listener and the tunnel manager, all on one event loop.
public final class TunnelClient: Sendable {
    private let resolved: ClientSettings.Resolved
    private let eventLoop: any EventLoop
    private let logger: Logger
    private let manager: NIOLoopBoundBox<ClientTunnelManager>
    private let listener = NIOLockedValueBoxChannel()

    public init(resolved: ClientSettings.Resolved, eventLoop: any EventLoop, logger: Logger) {
        self.resolved = resolved
        self.eventLoop = eventLoop
        self.logger = logger
        self.manager = NIOLoopBoundBox.makeBoxSendingValue(
            ClientTunnelManager(eventLoop: eventLoop, resolved: resolved, logger: logger), eventLoop: eventLoop
        )
    }

    /// Binds the SOCKS listener and starts the tunnel; returns the bound SOCKS address.
    public func start() async throws -> SocketAddress {
        let manager = self.manager
        let logger = self.logger
        var proxyConfiguration = LocalProxyHandler.Configuration()
        if let user = self.resolved.settings.socksUser, let pass = self.resolved.settings.socksPassword {
            proxyConfiguration.credentials = ProxyCredentials(username: user, password: pass)
        }
        if self.resolved.settings.udp {
            proxyConfiguration.udpRelay = ClientUDPRelay(
                manager: manager, idleTimeout: .nanoseconds(self.resolved.settings.udpIdleTimeout)
            )
        }
        let configuration = proxyConfiguration
        let channel = try await ServerBootstrap(group: self.eventLoop)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.maxMessagesPerRead, value: StreamSocket.maxMessagesPerRead)
            .childChannelOption(.recvAllocator, value: StreamSocket.receiveAllocator)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        LocalProxyHandler(provider: manager.value, configuration: configuration, logger: logger)
                    )
                }
            }
            .bind(host: self.resolved.settings.socks.host, port: self.resolved.settings.socks.port)
            .get()
        self.listener.set(channel)
        self.eventLoop.execute { manager.value.start() }
        guard let address = channel.localAddress else { throw ChannelError.unknownLocalAddress }
        return address
    }

    /// Graceful shutdown: stop accepting SOCKS connections, let streams drain, CLOSE the tunnel.
    public func shutdown() async {
        if let channel = self.listener.take() { try? await channel.close() }
        let timeout = TimeAmount.nanoseconds(self.resolved.settings.timings.drainTimeout)
        let manager = self.manager
        let done = self.eventLoop.flatSubmit { manager.value.shutdown(drainTimeout: timeout) }
        try? await done.get()
    }
}

