import LocalProxy
import Logging
import NIOCore
import TunnelProtocol

/// Serves the first exchange on one accepted local connection, whatever the application speaks (told apart
/// by the first byte): SOCKS5 (RFC 1928, with RFC 1929 username/password when credentials are set), SOCKS4
/// and SOCKS4a, or HTTP (CONNECT, or a plain request in absolute form). Once the tunnel stream is open it
/// answers in the application's protocol and hands the connection to a `LocalStreamHandler` (or, for plain
/// HTTP, to an `HTTPForwardHandler` that keeps looking at each request and response).
public final class LocalProxyHandler: ChannelInboundHandler, RemovableChannelHandler, NIOScheduledCallbackHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// Settings shared by every local connection.
    public struct Configuration: Sendable {
        /// Required username and password; `nil` serves without authentication.
        public var credentials: ProxyCredentials?
        /// The whole handshake must arrive within this time.
        public var handshakeTimeout: TimeAmount = .seconds(10)
        /// Serves UDP ASSOCIATE (SOCKS5), or `nil` to answer it "command not supported".
        public var udpRelay: (any UDPRelayProvider)?
        public init(credentials: ProxyCredentials? = nil) { self.credentials = credentials }
    }

    private enum Phase {
        /// No byte yet.
        case detecting
        case socks5(SOCKS5ServerStateMachine)
        case socks4(SOCKS4ServerStateMachine)
        /// Reading the first HTTP request head.
        case http
        /// A stream was requested for this relay; its result decides the reply.
        case waiting(ReplyStyle, LocalStreamHandler)
        /// Answered: the relay takes every event of this connection from here on.
        case relaying(LocalStreamHandler)
        /// Handed over, failed or closed: nothing more to do here.
        case finished
    }

    /// How the application gets its answer.
    private enum ReplyStyle {
        case socks5, socks4, httpConnect
    }

    private var phase: Phase = .detecting
    private var buffered: ByteBuffer?
    private let provider: any TunnelStreamProvider
    private let configuration: Configuration
    private let baseLogger: Logger
    /// The logger with the application's address, made on first use: most connections never log, and
    /// formatting the address for each would cost more than the rest of the handshake.
    private lazy var logger: Logger = {
        var logger = self.baseLogger
        if let peer = self.peer { logger[metadataKey: "app"] = "\(peer.hostPortDescription)" }
        return logger
    }()
    private var peer: SocketAddress?
    /// The handshake's time limit: a scheduled callback, not a task, as most connections cancel it and a task
    /// costs a promise and two closures. The context is kept for it.
    private var timeout: NIOScheduledCallback?
    private var context: ChannelHandlerContext?
    /// The application half-closed while its request was pending: the stream starts with a FIN.
    private var inputClosed = false

    public init(provider: any TunnelStreamProvider, configuration: Configuration, logger: Logger) {
        self.provider = provider
        self.configuration = configuration
        self.baseLogger = logger
    }

    /// Most bytes an application may send before its request is answered.
    static let maxEarlyData = 64 << 10

    // MARK: - Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        self.peer = context.channel.remoteAddress
        self.context = context
        self.timeout = try? context.eventLoop.assumeIsolated().scheduleCallback(
            in: self.configuration.handshakeTimeout,
            handler: self
        )
        if context.channel.isActive { context.read() }
    }

    public func handleScheduledCallback(eventLoop: some EventLoop) {
        self.timeout = nil
        guard let context = self.context else { return }
        switch self.phase {
        case .waiting, .relaying, .finished: return  // the tunnel's own limits apply once a stream was asked for
        default: break
        }
        self.logger.info("proxy handshake timed out")
        self.finish(context: context)
    }

    private func cancelTimeout() {
        self.timeout?.cancel()
        self.timeout = nil
    }

    public func channelActive(context: ChannelHandlerContext) {
        context.read()
        context.fireChannelActive()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.cancelTimeout()
        self.context = nil
        if case .relaying(let relay) = self.phase { relay.handlerRemoved(context: context) }
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .relaying(let relay) = self.phase {
            relay.channelRead(context: context, data: data)
            return
        }
        var incoming = self.unwrapInboundIn(data)
        if (self.buffered?.readableBytes ?? 0) == 0 {
            // Nothing left of the last read (a greeting answered): keep the new read as it is. Appending would
            // copy it into the last read's storage, which NIO's receive buffer still shares.
            self.buffered = incoming
        } else {
            self.buffered!.writeBuffer(&incoming)
        }
        self.advance(context: context)
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        // Keep read interest while the request is pending (early data is kept, bounded): dropping and
        // re-arming it would cost two epoll_ctl calls per connection.
        switch self.phase {
        case .relaying(let relay):
            relay.channelReadComplete(context: context)
            return
        case .finished: break
        default:
            if (self.buffered?.readableBytes ?? 0) < Self.maxEarlyData { context.read() }
        }
        context.fireChannelReadComplete()
        // A request read: its OPEN and, under fast open, the application's answer go now, not after every other
        // socket ready in this tick (last: the answer hands this channel over to the relay).
        if case .waiting(_, let local) = self.phase { local.stream?.sendOpensNow() }
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .relaying(let relay) = self.phase {
            relay.userInboundEventTriggered(context: context, event: event)
            return
        }
        if let event = event as? ChannelEvent, event == .inputClosed {
            self.inputClosed = true
            if case .waiting = self.phase { return }
            // EOF before a complete request: nothing to serve.
            self.finish(context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if case .relaying(let relay) = self.phase {
            relay.channelInactive(context: context)
            return
        }
        self.cancelTimeout()
        if case .waiting(_, let local) = self.phase {
            self.phase = .finished
            self.provider.cancelStreamRequest(local)
        }
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .relaying(let relay) = self.phase {
            relay.errorCaught(context: context, error: error)
            return
        }
        self.logger.debug("local connection error: \(error)")
        self.finish(context: context)
    }

    private func finish(context: ChannelHandlerContext) {
        switch self.phase {
        case .finished, .relaying: return
        default: break
        }
        if case .waiting(_, let local) = self.phase { self.provider.cancelStreamRequest(local) }
        self.phase = .finished
        self.cancelTimeout()
        context.close(promise: nil)
    }

    private func replyAndClose(_ bytes: ByteBuffer, reason: String, context: ChannelHandlerContext) {
        self.logger.info("proxy request refused: \(reason)")
        self.phase = .finished
        self.cancelTimeout()
        context.writeAndFlush(self.wrapOutboundOut(bytes)).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    // MARK: - The handshake

    private func advance(context: ChannelHandlerContext) {
        while true {
            switch self.phase {
            case .detecting:
                guard let first = self.buffered?.getInteger(at: self.buffered!.readerIndex, as: UInt8.self) else {
                    return
                }
                switch LocalProxyProtocol.detect(firstByte: first) {
                case .socks5:
                    self.phase = .socks5(SOCKS5ServerStateMachine(credentials: self.configuration.credentials))
                case .socks4:
                    self.phase = .socks4(SOCKS4ServerStateMachine(credentials: self.configuration.credentials))
                case .http: self.phase = .http
                case nil:
                    self.logger.info(
                        "closed a local connection that speaks no proxy protocol (first byte 0x\(String(first, radix: 16)))"
                    )
                    self.finish(context: context)
                    return
                }
            case .socks5(var machine):
                let action = machine.receive(&self.buffered!)
                self.phase = .socks5(machine)
                switch action {
                case .needMoreData: return
                case .send(let bytes): context.writeAndFlush(self.wrapOutboundOut(bytes), promise: nil)
                case .request(let command):
                    self.serve(command, style: .socks5, context: context)
                    return
                case .replyAndClose(let bytes, let reason):
                    self.replyAndClose(bytes, reason: reason, context: context)
                    return
                case .close(let reason):
                    self.logger.info("SOCKS5 connection closed: \(reason)")
                    self.finish(context: context)
                    return
                }
            case .socks4(var machine):
                let action = machine.receive(&self.buffered!)
                self.phase = .socks4(machine)
                switch action {
                case .needMoreData: return
                case .request(let command):
                    self.serve(command, style: .socks4, context: context)
                    return
                case .replyAndClose(let bytes, let reason):
                    self.replyAndClose(bytes, reason: reason, context: context)
                    return
                case .close(let reason):
                    self.logger.info("SOCKS4 connection closed: \(reason)")
                    self.finish(context: context)
                    return
                }
            case .http:
                self.advanceHTTP(context: context)
                return
            case .waiting, .relaying, .finished:
                return
            }
        }
    }

    private func advanceHTTP(context: ChannelHandlerContext) {
        let head: HTTPRequestHead
        do {
            guard let parsed = try HTTPHeadParser.parseRequest(&self.buffered!) else { return }
            head = parsed
        } catch {
            self.replyAndClose(
                HTTPProxy.errorResponse(status: 400, message: error.description),
                reason: "\(error)",
                context: context
            )
            return
        }
        switch HTTPProxy.decide(head, credentials: self.configuration.credentials) {
        case .reject(let status, let message, let authenticate):
            self.replyAndClose(
                HTTPProxy.errorResponse(status: status, message: message, authenticate: authenticate),
                reason: "HTTP \(status): \(message)",
                context: context
            )
        case .tunnel(let target):
            self.serve(.connect(target), style: .httpConnect, context: context)
        case .forward:
            // Plain HTTP: a handler that follows every request and response of this connection takes over,
            // starting again from this head.
            self.phase = .finished
            self.cancelTimeout()
            var replay = head.encodedForReplay()
            if let rest = self.buffered { replay.writeImmutableBuffer(rest) }
            self.buffered = nil
            let forward = HTTPForwardHandler(
                provider: self.provider,
                credentials: self.configuration.credentials,
                logger: self.logger,
                initialBytes: replay
            )
            do {
                try context.pipeline.syncOperations.addHandler(forward)
                context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            } catch {
                context.close(promise: nil)
            }
        }
    }

    private func serve(_ command: ProxyCommand, style: ReplyStyle, context: ChannelHandlerContext) {
        switch command {
        case .connect(let target):
            let local = LocalStreamHandler()
            self.phase = .waiting(style, local)
            local.onOpenResult = { [weak self] reply, bound in
                self?.openResult(reply, bound: bound, context: context)
            }
            if self.baseLogger.logLevel <= .debug { self.logger.debug("CONNECT \(target)") }
            self.provider.requestStream(to: target, local: local)
        case .udpAssociate(let client):
            guard let relay = self.configuration.udpRelay else {
                self.replyAndClose(
                    SOCKS5.reply(.commandNotSupported),
                    reason: "UDP ASSOCIATE not enabled",
                    context: context
                )
                return
            }
            self.phase = .finished
            self.cancelTimeout()
            // The relay takes the control connection over; this handler steps aside.
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            relay.associate(control: context.channel, announced: client, logger: self.logger)
        }
    }

    private func openResult(_ reply: ReplyCode, bound: TargetAddress, context: ChannelHandlerContext) {
        guard case .waiting(let style, let local) = self.phase else { return }
        self.phase = .finished
        self.cancelTimeout()
        guard reply == .succeeded, local.stream != nil else {
            if self.baseLogger.logLevel <= .debug { self.logger.debug("CONNECT failed: \(reply)") }
            let answer: ByteBuffer
            switch style {
            case .socks5: answer = SOCKS5.reply(reply, bound: .unspecified)
            case .socks4: answer = SOCKS4.reply(reply)
            case .httpConnect:
                let (status, _) = HTTPProxy.status(for: reply)
                answer = HTTPProxy.errorResponse(status: status, message: "\(reply)")
            }
            context.writeAndFlush(self.wrapOutboundOut(answer)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
            return
        }
        let answer: ByteBuffer
        switch style {
        case .socks5: answer = SOCKS5.reply(.succeeded, bound: bound)
        case .socks4: answer = SOCKS4.reply(.succeeded, bound: bound)
        case .httpConnect: answer = ByteBuffer(string: HTTPProxy.connectEstablished)
        }
        context.writeAndFlush(self.wrapOutboundOut(answer), promise: nil)
        let early = self.buffered
        self.buffered = nil
        self.phase = .relaying(local)
        local.takeOver(hostedAt: context, early: early, inputClosed: self.inputClosed)
    }
}

@available(*, unavailable)
extension LocalProxyHandler: Sendable {}

extension HTTPRequestHead {
    /// The head as the application sent it (re-encoded), to be parsed again by the forward handler.
    func encodedForReplay() -> ByteBuffer { self.encoded() }
}
