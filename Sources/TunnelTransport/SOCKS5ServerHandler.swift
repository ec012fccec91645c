import Logging
import NIOCore
import SOCKS5
import TunnelProtocol

/// Serves the SOCKS5 handshake on one accepted local connection, then hands the connection to a
/// `LocalStreamHandler` bound to the tunnel stream it asked for. The reply to the application carries the
/// outcome the server reported (RFC 1928 §6 codes) and the server's bound address.
public final class SOCKS5ServerHandler: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private var machine = SOCKS5ServerStateMachine()
    private var buffered: ByteBuffer?
    private let provider: any TunnelStreamProvider
    private let handshakeTimeout: TimeAmount
    private var logger: Logger
    private var local: LocalStreamHandler?
    private var timeout: Scheduled<Void>?
    private var finished = false
    /// The application half-closed while its CONNECT was pending: the stream starts with a FIN.
    private var inputClosed = false

    public init(provider: any TunnelStreamProvider, handshakeTimeout: TimeAmount = .seconds(10), logger: Logger) {
        self.provider = provider
        self.handshakeTimeout = handshakeTimeout
        self.logger = logger
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        if let peer = context.channel.remoteAddress { self.logger[metadataKey: "app"] = "\(peer.hostPortDescription)" }
        self.timeout = context.eventLoop.assumeIsolated().scheduleTask(in: self.handshakeTimeout) {
            self.logger.info("SOCKS handshake timed out")
            self.finish(context: context)
        }
        if context.channel.isActive { context.read() }
    }

    public func channelActive(context: ChannelHandlerContext) {
        context.read()
        context.fireChannelActive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = self.unwrapInboundIn(data)
        if self.buffered == nil {
            self.buffered = incoming
        } else {
            self.buffered!.writeBuffer(&incoming)
        }
        guard self.local == nil else { return }  // request already made; keep early data for the stream
        guard self.buffered!.readableBytes <= 1024 else {
            self.logger.info("SOCKS handshake larger than any valid one")
            self.finish(context: context)
            return
        }
        while !self.finished {
            switch self.machine.receive(&self.buffered!) {
            case .needMoreData:
                return
            case .send(let bytes):
                context.writeAndFlush(self.wrapOutboundOut(bytes), promise: nil)
            case .connect(let target):
                self.request(target, context: context)
                return
            case .replyAndClose(let bytes, let reason):
                self.logger.info("SOCKS request refused: \(reason)")
                self.finished = true
                self.timeout?.cancel()
                context.writeAndFlush(self.wrapOutboundOut(bytes)).assumeIsolated().whenComplete { _ in
                    context.close(promise: nil)
                }
                return
            case .close(let reason):
                self.logger.info("SOCKS connection closed: \(reason)")
                self.finish(context: context)
                return
            }
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        // Keep read interest while waiting for the stream (early data is kept, bounded below): dropping and
        // re-arming it would cost two epoll_ctl calls per connection.
        if !self.finished && (self.buffered?.readableBytes ?? 0) < Self.maxEarlyData { context.read() }
        context.fireChannelReadComplete()
    }

    /// Most bytes an application may send before its CONNECT is answered.
    static let maxEarlyData = 64 << 10

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            self.inputClosed = true
            if self.local == nil {
                // EOF before a complete request: nothing to serve.
                self.finish(context: context)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        self.timeout?.cancel()
        if let local = self.local, !self.finished {
            self.finished = true
            self.provider.cancelStreamRequest(local)
        }
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("SOCKS connection error: \(error)")
        self.finish(context: context)
    }

    private func finish(context: ChannelHandlerContext) {
        guard !self.finished else { return }
        self.finished = true
        self.timeout?.cancel()
        if let local = self.local { self.provider.cancelStreamRequest(local) }
        context.close(promise: nil)
    }

    private func request(_ target: TargetAddress, context: ChannelHandlerContext) {
        let local = LocalStreamHandler()
        self.local = local
        local.onOpenResult = { [weak self] reply, bound in
            self?.openResult(reply, bound: bound, local: local, context: context)
        }
        self.logger.debug("CONNECT \(target)")
        self.provider.requestStream(to: target, local: local)
    }

    private func openResult(_ reply: ReplyCode, bound: TargetAddress, local: LocalStreamHandler, context: ChannelHandlerContext) {
        guard !self.finished else { return }
        self.finished = true
        self.timeout?.cancel()
        guard reply == .succeeded, let stream = local.stream else {
            self.logger.debug("CONNECT failed: \(reply)")
            context.writeAndFlush(self.wrapOutboundOut(SOCKS5.reply(reply, bound: .unspecified))).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
            return
        }
        context.writeAndFlush(self.wrapOutboundOut(SOCKS5.reply(.succeeded, bound: bound)), promise: nil)
        let early = self.buffered.flatMap { $0.readableBytes > 0 ? $0 : nil }
        self.buffered = nil
        do {
            try context.pipeline.syncOperations.addHandler(local)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        } catch {
            context.close(promise: nil)
            return
        }
        if let early, let mux = local.multiplexer {
            mux.localRead(early, on: stream)
        }
        if self.inputClosed, let mux = local.multiplexer {
            mux.localEndOfStream(on: stream)
        }
        local.streamStarted()
    }
}

@available(*, unavailable)
extension SOCKS5ServerHandler: Sendable {}
