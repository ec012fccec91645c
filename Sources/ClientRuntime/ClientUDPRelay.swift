import LocalProxy
import Logging
import NIOCore
import NIOPosix
import TunnelProtocol
import TunnelRuntime
import TunnelTransport

/// SOCKS5 UDP ASSOCIATE on the client (RFC 1928 §7): each association gets a UDP socket on the address the
/// application reached the proxy on, and a tunnel stream of kind UDP whose DATAGRAM frames carry the
/// datagrams. The association lives as long as its TCP control connection (or until it idles out).
final class ClientUDPRelay: UDPRelayProvider, @unchecked Sendable {
    // Confined to the client's one event loop, like everything else on the client.
    private let manager: NIOLoopBoundBox<ClientTunnelManager>
    private let idleTimeout: TimeAmount

    init(manager: NIOLoopBoundBox<ClientTunnelManager>, idleTimeout: TimeAmount) {
        self.manager = manager
        self.idleTimeout = idleTimeout
    }

    func associate(control: any Channel, announced: TargetAddress, logger: Logger) {
        let association = ClientUDPAssociation(
            control: control,
            announced: announced,
            provider: self.manager.value,
            idleTimeout: self.idleTimeout,
            logger: logger
        )
        association.start()
    }
}

/// One UDP association on the client.
final class ClientUDPAssociation: StreamEndpoint {
    private let control: any Channel
    private let provider: any TunnelStreamProvider
    private let idleTimeout: TimeAmount
    private var logger: Logger
    /// The application's address as the control connection shows it; datagrams from anywhere else are dropped.
    private let applicationIP: [UInt8]?
    private let announcedPort: Int
    private var applicationAddress: SocketAddress?

    private var udp: (any Channel)?
    private var stream: TunnelStream?
    private var streamOpen = false
    private var replied = false
    private var closed = false
    private var lastActivity = NIODeadline.now()
    private var timer: Scheduled<Void>?
    private var tally = DatagramTally()
    /// Datagrams were written to the relay socket and wait for the flush at the end of the tunnel read.
    private var flushPending = false

    init(
        control: any Channel,
        announced: TargetAddress,
        provider: any TunnelStreamProvider,
        idleTimeout: TimeAmount,
        logger: Logger
    ) {
        self.control = control
        self.provider = provider
        self.idleTimeout = idleTimeout
        self.logger = logger
        self.applicationIP = control.remoteAddress?.packedBytes
        self.announcedPort = Int(announced.port)
    }

    func start() {
        do {
            try self.control.pipeline.syncOperations.addHandler(UDPControlHandler(association: self))
        } catch {
            self.control.close(promise: nil)
            return
        }
        let host = self.control.localAddress?.ipAddress ?? "127.0.0.1"
        let reader = NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>(
            { [weak self] in self?.applicationDatagram($0) },
            eventLoop: self.control.eventLoop
        )
        let wantsMore = NIOLoopBound<() -> Bool>(
            { [weak self] in self?.stream?.wantsDatagrams ?? true },
            eventLoop: self.control.eventLoop
        )
        DatagramReader.bind(host: host, port: 0, on: self.control.eventLoop, receive: reader, wantsMore: wantsMore)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    if self.closed {
                        channel.close(promise: nil)
                        return
                    }
                    self.udp = channel
                    self.replyIfReady()
                case .failure(let error):
                    self.logger.info("UDP ASSOCIATE: cannot bind a relay socket: \(error)")
                    self.fail(.generalFailure)
                }
            }
        self.provider.requestStream(to: .unspecified, kind: .udp, local: self)
        self.armIdleTimer()
    }

    private func armIdleTimer() {
        let deadline = self.lastActivity + self.idleTimeout
        self.timer = self.control.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            guard !self.closed else { return }
            if NIODeadline.now() - self.lastActivity >= self.idleTimeout {
                self.logger.debug("UDP association idle for \(self.idleTimeout.nanoseconds / 1_000_000_000) s")
                self.close()
            } else {
                self.armIdleTimer()
            }
        }
    }

    private func replyIfReady() {
        guard !self.replied, !self.closed, self.streamOpen, let udp = self.udp, let bound = udp.localAddress else {
            return
        }
        self.replied = true
        self.control.writeAndFlush(SOCKS5.reply(.succeeded, bound: bound.targetAddress), promise: nil)
        self.logger.debug("UDP ASSOCIATE: relay on \(bound.hostPortDescription)")
    }

    private func fail(_ reply: ReplyCode) {
        guard !self.closed else { return }
        if !self.replied {
            self.replied = true
            let control = self.control
            control.writeAndFlush(SOCKS5.reply(reply)).assumeIsolated().whenComplete { _ in control.close(promise: nil)
            }
        }
        self.close()
    }

    /// Ends the association: the relay socket, the tunnel stream and the control connection.
    func close() {
        guard !self.closed else { return }
        self.closed = true
        self.timer?.cancel()
        self.tally.logEnd("UDP association", sockets: self.udp.map { [$0] } ?? [], logger: self.logger)
        self.udp?.close(promise: nil)
        if let stream = self.stream {
            stream.release()
        } else if !self.streamOpen {
            // Still queued for a tunnel (reconnecting): it must not be opened for an application that left.
            self.provider.cancelStreamRequest(self)
        }
        self.stream = nil
        if self.replied { self.control.close(promise: nil) }
    }

    // MARK: - From the application

    func applicationDatagram(_ envelope: AddressedEnvelope<ByteBuffer>) {
        guard !self.closed, let stream = self.stream else { return }
        // Only the application that asked may use the relay (RFC 1928 §7).
        if let fixed = self.applicationAddress {
            guard envelope.remoteAddress == fixed else { return self.drop() }
        } else {
            guard envelope.remoteAddress.packedBytes == self.applicationIP,
                self.announcedPort == 0 || envelope.remoteAddress.port == self.announcedPort
            else { return self.drop() }
            self.applicationAddress = envelope.remoteAddress
        }
        switch SOCKS5UDP.tunnelPayload(fromApplication: envelope.data) {
        case .success(let slice):
            // The read buffer is as large as the largest datagram: a small one is copied out, so a queue of
            // them holds their bytes and not 64 KiB each, and the read buffer can be used again.
            var payload = slice
            if slice.storageCapacity > 2 * slice.readableBytes {
                payload = ByteBuffer()
                payload.reserveCapacity(slice.readableBytes)
                payload.writeImmutableBuffer(slice)
            }
            if stream.sendDatagram(payload) {
                self.tally.sent += 1
                self.lastActivity = .now()
            } else {
                self.drop()
            }
        case .failure:
            self.drop()
        }
    }

    private func drop() {
        self.tally.dropped += 1
    }

    // MARK: - StreamEndpoint

    func attach(_ stream: TunnelStream) {
        self.stream = stream
    }

    func openCompleted(reply: ReplyCode, bound: TargetAddress) {
        guard reply == .succeeded else {
            self.stream = nil
            self.fail(reply)
            return
        }
        self.streamOpen = true
        self.replyIfReady()
    }

    func cancelPendingOpen() {
        self.close()
    }

    func deliverDatagram(_ payload: ByteBuffer) {
        guard !self.closed, let udp = self.udp, let application = self.applicationAddress else { return }
        guard udp.isWritable else { return self.drop() }
        self.tally.received += 1
        self.lastActivity = .now()
        let datagram = SOCKS5UDP.applicationDatagram(fromTunnel: payload, allocator: udp.allocator)
        udp.write(AddressedEnvelope(remoteAddress: application, data: datagram), promise: nil)
        // One flush after the tunnel read: the datagrams of a burst go out in one sendmmsg.
        if !self.flushPending {
            self.flushPending = true
            self.stream?.needsFlush(self)
        }
    }

    func deliver(_ data: ByteBuffer) {}
    func flushDelivered() {
        self.flushPending = false
        self.udp?.flush()
    }
    func peerFinished() { self.close() }
    func streamClosed(reset: ErrorCode?) {
        self.stream = nil
        self.close()
    }
    func readIfWanted() {
        self.udp?.read()
    }
}

/// Watches the association's TCP control connection: when it ends, so does the association.
final class UDPControlHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let association: ClientUDPAssociation

    init(association: ClientUDPAssociation) {
        self.association = association
    }

    func handlerAdded(context: ChannelHandlerContext) {
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func channelReadComplete(context: ChannelHandlerContext) {
        context.read()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            self.association.close()
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.association.close()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
