import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TunnelConfig
import TunnelEventLoop
import TunnelProtocol
import TunnelRuntime
import TunnelTransport

/// `tunnel-server`: accepts tunnel connections, runs one session per client connection on its own event
/// loop, and opens the outbound connections streams ask for.
///
/// Two groups of loops: `sessionLoops`, our own (one per core), carry the tunnel connections, their outbound
/// sockets and UDP associations; NIO's `group` the rest (health checks, the summaries' timer, the full tunnel's
/// device and DNS). Without `sessionLoops` (`--event-loop nio`, `--tun`) NIO's group carries everything.
public final class TunnelServer: Sendable {
    private let resolved: ServerSettings.Resolved
    private let group: any EventLoopGroup
    private let sessionLoops: EpollEventLoopGroup?
    private let ownListener = NIOLockedValueBox<EpollListener?>(nil)
    private let registry: ServerSessionRegistry
    private let connector: OutboundConnector
    private let resolverPool: NIOThreadPool
    private let logger: Logger
    private let listener = NIOLockedValueBoxChannel()
    /// The health-check port, if any.
    private let healthListener = NIOLockedValueBoxChannel()
    private let startedAt = NIODeadline.now()
    private let tun = NIOLockedValueBox<ServerTUN?>(nil)
    /// Logs the summaries of throttled handshake failures once a minute.
    private let summaryTask = NIOLockedValueBox<RepeatedTask?>(nil)

    public init(
        resolved: ServerSettings.Resolved,
        group: any EventLoopGroup,
        sessionLoops: EpollEventLoopGroup? = nil,
        logger: Logger
    ) {
        self.resolved = resolved
        self.group = group
        self.sessionLoops = sessionLoops
        self.logger = logger
        self.registry = ServerSessionRegistry(
            authorizedKeys: resolved.authorizedKeys,
            maxPendingHandshakes: resolved.settings.maxPendingHandshakes
        )
        self.resolverPool = NIOThreadPool(numberOfThreads: 2)
        self.resolverPool.start()
        self.connector = OutboundConnector(
            connectTimeout: .nanoseconds(resolved.settings.connectTimeout),
            policy: resolved.settings.destinationPolicy,
            hostAddresses: HostAddresses(),
            resolverPool: self.resolverPool
        )
    }

    /// What `tunnel-server status` shows (README, *Operating it*).
    public func report(streams: Bool) -> EventLoopFuture<ServerReport> {
        let loop = self.group.next()
        let now = NIODeadline.now()
        var report = ServerReport(
            listen: (self.ownListener.withLockedValue { $0?.localAddress } ?? self.listener.current?.localAddress)
                .flatMap(Self.hostPort) ?? "\(self.resolved.listen)",
            uptimeSeconds: seconds(now - self.startedAt),
            authorizedKeys: self.registry.authorizedKeys.entries.count,
            handshaking: self.registry.handshakesInProgress
        )
        report.totals = self.registry.endedTraffic
        let sessions = self.registry.sessionsToReport().map { handle in
            handle.eventLoop.submit { () -> SessionReport? in
                (handle.handler.value.delegate as? ServerSession)?.report(streams: streams, now: now)
            }
        }
        let gathered = report
        return EventLoopFuture.whenAllComplete(sessions, on: loop).map { results in
            var report = gathered
            for case .success(let session?) in results {
                report.sessions.append(session)
                report.totals.add(session.traffic)
            }
            report.sessions.sort { $0.sessionSeconds > $1.sessionSeconds }
            return report
        }
    }

    /// What a reload did (README, *Operating it*).
    public struct ReloadOutcome: Codable, Sendable {
        public var keys: Int
        public var added: Int
        public var removed: Int
        /// Sessions of removed keys that were closed.
        public var closedSessions: Int
    }

    /// Re-reads the authorized-keys file (SIGHUP, `tunnel-server reload`): sessions of keys still listed go
    /// on untouched, those of removed keys are closed; a file that cannot be read or parsed changes nothing
    /// (the error is logged in one line and returned).
    public func reload() -> Result<ReloadOutcome, ConfigError> {
        guard let path = self.resolved.settings.authorizedKeysPath else {
            return .failure(ConfigError("no authorized-keys file to reload"))
        }
        let before = self.registry.authorizedKeys
        let keys: AuthorizedKeys
        do {
            keys = try AuthorizedKeys.load(from: path)
        } catch {
            self.logger.error("reload failed: \(error.message); keeping the \(before.entries.count) keys in use")
            return .failure(error)
        }
        let old = Set(before.entries.map(\.key))
        let new = Set(keys.entries.map(\.key))
        let removedSessions = self.registry.replaceAuthorizedKeys(keys)
        for (_, handle) in removedSessions {
            handle.eventLoop.execute {
                let tunnel = handle.handler.value
                if tunnel.core.isDetached {
                    tunnel.abandon(code: .notAuthorized, why: "the client's key was removed")
                } else {
                    tunnel.close(code: .notAuthorized)
                }
            }
        }
        let outcome = ReloadOutcome(
            keys: keys.entries.count,
            added: new.subtracting(old).count,
            removed: old.subtracting(new).count,
            closedSessions: removedSessions.count
        )
        let closed = removedSessions.map { "\($0.key.base64.prefix(8))" }.joined(separator: ", ")
        self.logger.info(
            "reloaded \(path): \(outcome.keys) keys (\(outcome.added) added, \(outcome.removed) removed)\(closed.isEmpty ? "" : "; closed the sessions of \(closed)")"
        )
        return .success(outcome)
    }

    /// Opens the health-check port: each connection gets "ok" and is closed. Returns its bound address.
    public func startHealthCheck(on endpoint: Endpoint) async throws -> SocketAddress {
        let channel = try await ServerBootstrap(group: self.group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                var ok = channel.allocator.buffer(capacity: 3)
                ok.writeString("ok\n")
                return channel.writeAndFlush(ok).flatMap { channel.close() }
            }
            .bind(host: endpoint.host, port: endpoint.port)
            .get()
        self.healthListener.set(channel)
        guard let address = channel.localAddress else { throw ChannelError.unknownLocalAddress }
        return address
    }

    /// "127.0.0.1:7443", "[::1]:7443".
    private static func hostPort(_ address: SocketAddress) -> String? {
        guard let ip = address.ipAddress, let port = address.port else { return nil }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    /// Binds the listening socket; returns the real bound address (also when the port was 0).
    public func start() async throws -> SocketAddress {
        let settings = self.resolved.settings
        var connectionConfiguration = TunnelConnectionHandler.Configuration(settings.timings)
        connectionConfiguration.session.compression = settings.allowCompression
        connectionConfiguration.session.fullTunnel = settings.tun.enabled
        // The server's TUN device always has offload headers (ServerTUN).
        connectionConfiguration.session.packetOffload = settings.tun.enabled
        // Clients may send a stream's first bytes with its OPEN (fast open): held until the connect is done.
        connectionConfiguration.session.earlyData = true
        let configuration = connectionConfiguration
        var tun: ServerTUN? = nil
        if settings.tun.enabled {
            tun = try await ServerTUN.start(
                settings: settings.tun,
                policy: settings.destinationPolicy,
                statePath: CrashRecovery.serverStatePath(settings.tun, listen: self.resolved.listen),
                serverKey: self.resolved.key.publicKey,
                group: self.group,
                leaseHold: .nanoseconds(settings.timings.resumeGrace),
                logger: self.logger
            )
            self.tun.withLockedValue { $0 = tun }
        }
        let udpIdleTimeout = TimeAmount.nanoseconds(settings.udpIdleTimeout)
        let address: SocketAddress
        do {
            let setUp = self.connectionSetUp(configuration: configuration, tun: tun, udpIdleTimeout: udpIdleTimeout)
            address = try await self.bind(setUp)
        } catch {
            // Undo the full-tunnel setup when the port cannot be had.
            await tun?.stop()
            throw error
        }
        let registry = self.registry
        let logger = self.logger
        let task = self.group.next().scheduleRepeatedTask(initialDelay: .seconds(60), delay: .seconds(60)) { _ in
            for line in registry.failedHandshakeSummaries() { logger.info("\(line)") }
        }
        self.summaryTask.withLockedValue { $0 = task }
        return address
    }

    /// Binds the tunnel port: on our own loops (the listener on the first, each connection on the next loop in
    /// turn), else with NIO's bootstrap on `group`. Returns the bound address.
    private func bind(_ setUp: @escaping @Sendable (any Channel) throws -> Void) async throws -> SocketAddress {
        let listen = self.resolved.listen
        if let loops = self.sessionLoops {
            let listener = try await EpollListener.bind(
                host: listen.host,
                port: listen.port,
                backlog: 1024,
                on: loops.loops[0],
                children: loops
            ) { channel in
                try setUp(channel)
            }
            self.ownListener.withLockedValue { $0 = listener }
            return listener.localAddress
        }
        let channel = try await ServerBootstrap(group: self.group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try setUp(channel) }
            }
            .bind(host: listen.host, port: listen.port)
            .get()
        self.listener.set(channel)
        guard let address = channel.localAddress else { throw ChannelError.unknownLocalAddress }
        return address
    }

    /// What each accepted tunnel connection gets, on its loop: socket options, admission against the pending
    /// handshake limit, the connection handler and its session.
    private func connectionSetUp(
        configuration: TunnelConnectionHandler.Configuration,
        tun: ServerTUN?,
        udpIdleTimeout: TimeAmount
    ) -> @Sendable (any Channel) throws -> Void {
        let key = self.resolved.key
        let ciphers = self.resolved.settings.ciphers
        let registry = self.registry
        let connector = self.connector
        let logger = self.logger
        let timings = self.resolved.settings.timings
        let resumeGrace = TimeAmount.nanoseconds(self.resolved.settings.timings.resumeGrace)
        return { channel in
            try TunnelSocket.configure(channel, timings: timings, logger: logger)
            let handler = TunnelConnectionHandler(
                role: .server(ServerHandshakeStateMachine(staticKey: key, ciphers: ciphers)),
                configuration: configuration,
                logger: logger
            )
            let handle = ServerSessionRegistry.Handle(
                id: ObjectIdentifier(handler),
                handler: NIOLoopBound(handler, eventLoop: channel.eventLoop)
            )
            let source = ServerSessionRegistry.sourceKey(channel.remoteAddress)
            switch registry.beginHandshake(handle, source: source) {
            case .refused:
                channel.close(promise: nil)
                return
            case .admitted(let shed):
                // Room for this one: the oldest pending handshake of its source (or of all) goes.
                // It runs on its own loop: if its handshake finished meanwhile, it is a client now and stays.
                if let shed {
                    shed.eventLoop.execute {
                        let handler = shed.handler.value
                        if !handler.isEstablished { handler.close(code: .shutdown) }
                    }
                }
            }
            handler.delegate = ServerSession(
                registry: registry,
                connector: connector,
                handle: handle,
                udpIdleTimeout: udpIdleTimeout,
                resumeGrace: resumeGrace,
                timings: timings,
                tun: tun,
                source: source,
                logger: logger
            )
            try channel.pipeline.syncOperations.addHandler(handler)
        }
    }

    /// Graceful shutdown: stop accepting, GOAWAY to every client, let streams drain up to the drain timeout,
    /// then CLOSE every tunnel.
    public func shutdown() async {
        self.summaryTask.withLockedValue {
            $0?.cancel()
            $0 = nil
        }
        // The balancer learns first: the health port goes, then the tunnel port.
        if let channel = self.healthListener.take() { try? await channel.close() }
        if let channel = self.listener.take() { try? await channel.close() }
        if let listener = self.ownListener.withLockedValue({ $0 }) { await listener.close() }
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
        if let tun = self.tun.withLockedValue({ $0 }) { await tun.stop() }
        try? await self.resolverPool.shutdownGracefully()
    }
}
