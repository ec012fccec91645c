import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TunnelConfig
import TunnelProtocol
import TunnelTransport

/// `tunnel-server`: accepts tunnel connections, runs one session per client connection on its own event
/// loop, and opens the outbound connections streams ask for.
public final class TunnelServer: Sendable {
    private let resolved: ServerSettings.Resolved
    private let group: any EventLoopGroup
    private let registry: ServerSessionRegistry
    private let connector: OutboundConnector
    private let resolverPool: NIOThreadPool
    private let logger: Logger
    private let listener = NIOLockedValueBoxChannel()

    public init(resolved: ServerSettings.Resolved, group: any EventLoopGroup, logger: Logger) {
        self.resolved = resolved
        self.group = group
        self.logger = logger
        self.registry = ServerSessionRegistry(
            authorizedKeys: resolved.authorizedKeys, maxPendingHandshakes: resolved.settings.maxPendingHandshakes
        )
        self.resolverPool = NIOThreadPool(numberOfThreads: 2)
        self.resolverPool.start()
        self.connector = OutboundConnector(
            connectTimeout: .nanoseconds(resolved.settings.connectTimeout), deny: resolved.settings.deny, resolverPool: self.resolverPool
        )
    }

    /// Binds the listening socket; returns the real bound address (also when the port was 0).
    public func start() async throws -> SocketAddress {
        let settings = self.resolved.settings
        var connectionConfiguration = TunnelConnectionHandler.Configuration(settings.timings)
        connectionConfiguration.compression = settings.allowCompression
        let configuration = connectionConfiguration
        let key = self.resolved.key
        let ciphers = settings.ciphers
        let registry = self.registry
        let connector = self.connector
        let logger = self.logger
        let udpIdleTimeout = TimeAmount.nanoseconds(settings.udpIdleTimeout)
        let channel = try await ServerBootstrap(group: self.group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: TunnelSocket.writeBufferWaterMark)
            .childChannelOption(TunnelSocket.notSentLowWater, value: TunnelSocket.notSentLowWaterBytes)
            .childChannelOption(.recvAllocator, value: TunnelSocket.receiveAllocator)
            .childChannelOption(.maxMessagesPerRead, value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = TunnelConnectionHandler(
                        role: .server(ServerHandshakeStateMachine(staticKey: key, ciphers: ciphers)),
                        configuration: configuration, logger: logger
                    )
                    let handle = ServerSessionRegistry.Handle(
                        id: ObjectIdentifier(handler), handler: NIOLoopBound(handler, eventLoop: channel.eventLoop)
                    )
                    guard registry.beginHandshake(handle) else {
                        logger.info("refused connection from \(channel.remoteAddress?.description ?? "?"): too many handshakes in progress")
                        channel.close(promise: nil)
                        return
                    }
                    handler.delegate = ServerSession(
                        registry: registry, connector: connector, handle: handle, udpIdleTimeout: udpIdleTimeout, logger: logger
                    )
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .bind(host: self.resolved.listen.host, port: self.resolved.listen.port)
            .get()
        self.listener.set(channel)
        guard let address = channel.localAddress else { throw ChannelError.unknownLocalAddress }
        return address
    }

    /// Graceful shutdown: stop accepting, GOAWAY to every client, let streams drain up to the drain timeout,
    /// then CLOSE every tunnel.
    public func shutdown() async {
        if let channel = self.listener.take() { try? await channel.close() }
        let sessions = self.registry.beginShutdown()
        let timeout = TimeAmount.nanoseconds(self.resolved.settings.timings.drainTimeout)
        if !sessions.isEmpty { self.logger.info("shutting down: draining \(sessions.count) tunnel(s)") }
        var futures: [EventLoopFuture<Void>] = []
        for session in sessions {
            let promise = session.eventLoop.makePromise(of: Void.self)
            session.eventLoop.execute {
                session.handler.value.shutdown(drainTimeout: timeout) { promise.succeed(()) }
            }
            futures.append(promise.futureResult)
        }
        if let loop = futures.first?.eventLoop {
            try? await EventLoopFuture.andAllComplete(futures, on: loop).get()
        }
        try? await self.resolverPool.shutdownGracefully()
    }
}

/// The listening channel, set once bound and taken at shutdown.
final class NIOLockedValueBoxChannel: Sendable {
    private let box = NIOLockedValueBox<(any Channel)?>(nil)
    func set(_ channel: any Channel) { self.box.withLockedValue { $0 = channel } }
    func take() -> (any Channel)? { self.box.withLockedValue { value in defer { value = nil }; return value } }
}
