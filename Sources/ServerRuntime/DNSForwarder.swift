import Logging
import NIOCore
import NIOPosix
import TunnelRuntime

/// The server's DNS forwarder for full-tunnel clients: listens on the server's own pool addresses (port 53,
/// UDP) and asks the server's resolvers, so clients resolve names through the tunnel even when the server's
/// resolver is on its loopback (systemd-resolved, dnsmasq, unbound).
///
/// UDP: each query goes out from a fresh socket (a random source port, so answers cannot be spoofed by guessing
/// ports), rotating over the upstream servers; the first answer from that server with the query's ID goes
/// back to the client. Queries in flight are bounded; beyond that they are dropped (the client retries).
/// TCP (for answers too large for UDP): each connection is joined to a connection to an upstream server.
final class DNSForwarder {
    private let eventLoop: any EventLoop
    private let upstreams: [SocketAddress]
    private let logger: Logger
    private var listeners: [any Channel] = []
    private var tcpListeners: [any Channel] = []
    private var tcpConnections = 0
    private var inFlight = 0
    private var next = 0
    private(set) var dropped = 0

    static let maxInFlight = 512
    static let maxTCPConnections = 256
    static let timeout: TimeAmount = .seconds(5)

    init(eventLoop: any EventLoop, upstreams: [SocketAddress], logger: Logger) {
        self.eventLoop = eventLoop
        self.upstreams = upstreams
        self.logger = logger
    }

    /// Binds UDP port 53 on each address (which must be configured on this host).
    func start(on addresses: [SocketAddress]) -> EventLoopFuture<Void> {
        let reader = NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>(
            { [weak self] envelope in
                self?.query(envelope)
            },
            eventLoop: self.eventLoop
        )
        let futures = addresses.map { address -> EventLoopFuture<Void> in
            DatagramReader.bind(
                host: address.ipAddress ?? "",
                port: address.port ?? 53,
                on: self.eventLoop,
                capacity: 4096,
                receive: reader
            )
            .assumeIsolated().map { channel in self.listeners.append(channel) }.nonisolated()
        }
        let tcp = addresses.map { self.listenTCP(on: $0) }
        return EventLoopFuture.andAllSucceed(futures + tcp, on: self.eventLoop)
    }

    func stop() {
        for channel in self.listeners + self.tcpListeners { channel.close(promise: nil) }
        self.listeners.removeAll()
        self.tcpListeners.removeAll()
    }

    private func listenTCP(on address: SocketAddress) -> EventLoopFuture<Void> {
        let forwarder = NIOLoopBound(self, eventLoop: self.eventLoop)
        return ServerBootstrap(group: self.eventLoop)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { forwarder.value.acceptTCP(channel) }
            }
            .bind(to: address)
            .map { channel in forwarder.value.tcpListeners.append(channel) }
    }

    private func acceptTCP(_ client: any Channel) {
        guard self.tcpConnections < Self.maxTCPConnections, !self.upstreams.isEmpty else {
            client.close(promise: nil)
            return
        }
        self.tcpConnections += 1
        let done = NIOLoopBound<() -> Void>({ [weak self] in self?.tcpConnections -= 1 }, eventLoop: self.eventLoop)
        client.closeFuture.assumeIsolated().whenComplete { _ in done.value() }
        let upstream = self.upstreams[self.next % self.upstreams.count]
        self.next &+= 1
        ClientBootstrap(group: self.eventLoop)
            .connectTimeout(.seconds(5))
            .channelOption(.autoRead, value: false)
            .connect(to: upstream)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .failure:
                    client.close(promise: nil)
                case .success(let server):
                    client.closeFuture.whenComplete { _ in server.close(promise: nil) }
                    let (a, b) = GlueHandler.matchedPair()
                    do {
                        try client.pipeline.syncOperations.addHandler(a)
                        try server.pipeline.syncOperations.addHandler(b)
                    } catch {
                        client.close(promise: nil)
                        server.close(promise: nil)
                        return
                    }
                    // Reading starts now that bytes have somewhere to go (the glue paces it from here on).
                    client.setOption(.autoRead, value: true).whenFailure { _ in client.close(promise: nil) }
                    server.setOption(.autoRead, value: true).whenFailure { _ in server.close(promise: nil) }
                    // An idle or stuck exchange does not hold a slot for ever.
                    client.eventLoop.assumeIsolated().scheduleTask(in: .seconds(30)) { client.close(promise: nil) }
                }
            }
    }

    private func query(_ envelope: AddressedEnvelope<ByteBuffer>) {
        // A DNS message has a 12-byte header; anything shorter is not a query.
        guard envelope.data.readableBytes >= 12, !self.upstreams.isEmpty,
            let listener = self.listeners.first(where: {
                $0.localAddress?.protocol == envelope.remoteAddress.protocol
            })
        else { return }
        guard self.inFlight < Self.maxInFlight else {
            self.dropped += 1
            return
        }
        self.inFlight += 1
        let upstream = self.upstreams[self.next % self.upstreams.count]
        self.next &+= 1
        let id = envelope.data.getInteger(at: envelope.data.readerIndex, as: UInt16.self)!
        let client = envelope.remoteAddress
        let done = NIOLoopBound<() -> Void>({ [weak self] in self?.inFlight -= 1 }, eventLoop: self.eventLoop)
        let answer = NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Bool>(
            { reply in
                guard reply.remoteAddress == upstream, reply.data.readableBytes >= 12,
                    reply.data.getInteger(at: reply.data.readerIndex, as: UInt16.self) == id
                else { return false }
                listener.writeAndFlush(AddressedEnvelope(remoteAddress: client, data: reply.data), promise: nil)
                return true
            },
            eventLoop: self.eventLoop
        )
        DatagramBootstrap(group: self.eventLoop)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65536))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(DNSAnswerHandler(answer))
                }
            }
            .bind(host: upstream.protocol == .inet6 ? "::" : "0.0.0.0", port: 0)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .failure(let error):
                    self.logger.debug("DNS forwarder: cannot open a socket: \(error)")
                    done.value()
                case .success(let channel):
                    channel.closeFuture.assumeIsolated().whenComplete { _ in done.value() }
                    channel.writeAndFlush(AddressedEnvelope(remoteAddress: upstream, data: envelope.data), promise: nil)
                    channel.eventLoop.assumeIsolated().scheduleTask(in: Self.timeout) { channel.close(promise: nil) }
                }
            }
    }
}

/// One query's socket: passes the first matching answer on, then closes.
private final class DNSAnswerHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    private let answer: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Bool>

    init(_ answer: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Bool>) {
        self.answer = answer
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if self.answer.value(self.unwrapInboundIn(data)) { context.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ICMP port unreachable from the upstream: give up on this query now.
        context.close(promise: nil)
    }
}
