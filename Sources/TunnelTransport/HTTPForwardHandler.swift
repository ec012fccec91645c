import LocalProxy
import Logging
import NIOCore
import TunnelProtocol

/// A plain-HTTP forward proxy on one application connection (RFC 9112): each request in absolute form goes to
/// its origin through a tunnel stream, rewritten to origin form with hop-by-hop fields removed; each response
/// comes back unchanged. The handler follows message framing both ways, so one keep-alive connection can
/// carry requests to different hosts one after another (a new stream per host). A CONNECT on the same
/// connection turns it into a tunnel.
///
/// It is the stream endpoint of its current upstream stream: response bytes pass through its parser on their
/// way to the application as they arrive (flushed with each tunnel read, so a slow origin's first bytes and a
/// `100 Continue` are not held back), and credit returns as the application's socket takes them, so a
/// response of any size streams within the stream's window.
///
/// The protocol decisions are two values' (`HTTPRequestForwarder` for requests, its `HTTPResponseRelay` for
/// responses); this class moves bytes between them, the socket and the stream.
///
/// An application that leaves is noticed at once: a full close ends the stream (and a request still queued
/// or opening is cancelled), and so does a half-close while a request or response is outstanding, as Squid
/// does by default (`half_closed_clients off`): HTTP/1.1 clients do not half-close to finish a request.
public final class HTTPForwardHandler: ChannelInboundHandler, StreamEndpoint {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let provider: any TunnelStreamProvider
    private var logger: Logger
    private var context: ChannelHandlerContext?
    /// Requests (and, in `forwarder.response`, responses) as a pure value.
    private var forwarder: HTTPRequestForwarder
    /// The current upstream stream.
    private var stream: TunnelStream?
    /// Credit accounting: body bytes are handed to the socket as they came, heads are re-encoded (consumed
    /// otherwise).
    private var credit = StreamCreditReporter()
    /// A CONNECT that follows plain requests on this connection, while its stream opens.
    private var connectLocal: LocalStreamHandler?
    private var pendingWrites = false

    init(provider: any TunnelStreamProvider, credentials: ProxyCredentials?, logger: Logger, initialBytes: ByteBuffer) {
        self.provider = provider
        self.logger = logger
        self.forwarder = HTTPRequestForwarder(credentials: credentials, initialBytes: initialBytes)
    }

    // MARK: - Application side

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.processRequests()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.forwarder.received(self.unwrapInboundIn(data))
        self.processRequests()
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.readIfWanted()
        context.fireChannelReadComplete()
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            switch self.forwarder.applicationClosedInput() {
            case .wait: break
            case .close: self.closeClient()
            case .abort: self.applicationLeft()
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        self.cancelRequests()
        context.fireChannelInactive()
    }

    /// The application went away while a request was outstanding: end everything it asked for.
    private func applicationLeft() {
        guard let context = self.context else { return }
        self.logger.debug("HTTP client left before its response was complete")
        self.cancelRequests()
        context.close(promise: nil)
    }

    /// Cancels the upstream stream, a request still waiting for one, and a CONNECT being set up.
    private func cancelRequests() {
        if case .opening = self.forwarder.state, self.stream == nil { self.provider.cancelStreamRequest(self) }
        self.forwarder.finish()
        self.dropStream()
        if let local = self.connectLocal {
            self.connectLocal = nil
            local.onOpenResult = nil
            self.provider.cancelStreamRequest(local)
        }
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("HTTP proxy connection error: \(error)")
        self.forwarder.finish()
        context.close(promise: nil)
    }

    /// Reads the application's socket while a head is incomplete, or a body can flow (the stream has credit).
    public func readIfWanted() {
        guard let context = self.context, self.forwarder.wantsInput else { return }
        if case .body = self.forwarder.state, self.stream?.wantsInput != true { return }
        context.read()
    }

    /// Carries out what the forwarder says until it waits.
    private func processRequests() {
        while self.context != nil, let action = self.forwarder.next() {
            switch action {
            case .send(let bytes, let request):
                guard let stream = self.stream else {
                    // The upstream went away under a request: the application must see a failure, never a
                    // request that silently lost its bytes.
                    self.abortClient()
                    return
                }
                if let request { self.logger.debug("HTTP \(request)") }
                stream.send(bytes)
            case .open(let target, let request):
                self.logger.debug("HTTP \(request)")
                self.dropStream()
                self.provider.requestStream(to: target, local: self)
            case .connect(let target, let early):
                self.startTunnel(to: target, early: early)
            case .refuse(let status, let message, let authenticate):
                self.fail(status: status, message: message, authenticate: authenticate)
            case .close:
                self.closeClient()
            }
        }
    }

    /// CONNECT on a connection that carried plain requests: it becomes a tunnel to `target`.
    private func startTunnel(to target: TargetAddress, early: ByteBuffer) {
        self.dropStream()
        let local = LocalStreamHandler()
        self.connectLocal = local
        local.onOpenResult = { [weak self] reply, _ in
            guard let self, let context = self.context, context.channel.isActive else {
                // The application left while the stream opened: it is not needed.
                if reply == .succeeded { local.cancelPendingOpen() }
                return
            }
            self.connectLocal = nil
            guard reply == .succeeded, local.stream != nil else {
                let (status, _) = HTTPProxy.status(for: reply)
                self.fail(status: status, message: "\(reply)")
                return
            }
            context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: HTTPProxy.connectEstablished)), promise: nil)
            self.forwarder.finish()
            local.takeOver(from: context, early: early, inputClosed: self.forwarder.clientInputClosed)
        }
        self.provider.requestStream(to: target, local: local)
    }

    /// Answers with an error status and closes (after any response in flight).
    private func fail(status: Int, message: String, authenticate: Bool = false) {
        guard let context = self.context else { return }
        self.logger.info("HTTP proxy request refused: \(status) \(message)")
        self.forwarder.finish()
        self.dropStream()
        context.writeAndFlush(
            self.wrapOutboundOut(HTTPProxy.errorResponse(status: status, message: message, authenticate: authenticate))
        )
        .assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    private func closeClient() {
        guard let context = self.context else { return }
        self.forwarder.finish()
        self.dropStream()
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer())).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    /// The response cannot be completed: reset the application's connection so it sees a failure.
    private func abortClient() {
        guard let context = self.context else { return }
        self.forwarder.finish()
        self.dropStream()
        context.closeAbortively()
    }

    /// Lets go of the current stream (an idle keep-alive upstream is simply abandoned: the server resets its
    /// connection to the origin).
    private func dropStream() {
        self.forwarder.upstreamUnusable()
        guard let stream = self.stream else { return }
        self.stream = nil
        self.credit.reset()
        stream.release()
    }

    // MARK: - StreamEndpoint (the upstream)

    public func attach(_ stream: TunnelStream) {
        self.stream = stream
    }

    public func cancelPendingOpen() {
        self.dropStream()
    }

    /// A plain request may go with the open (fast open): if the server then fails to connect, the stream's
    /// reset aborts the application's connection (`streamClosed`), as for a CONNECT.
    public var takesEarlyAnswer: Bool { true }

    public func openCompleted(reply: ReplyCode, bound: TargetAddress) {
        guard case .opening = self.forwarder.state, self.context != nil else {
            // Nobody waits for this stream any more (the application left): let it go.
            if reply == .succeeded { self.dropStream() } else { self.stream = nil }
            return
        }
        guard reply == .succeeded, self.stream != nil else {
            self.forwarder.upstreamFailed()
            self.fail(status: HTTPProxy.status(for: reply).0, message: "\(reply)")
            return
        }
        self.credit.reset()
        self.forwarder.upstreamOpened()
        self.processRequests()
        self.readIfWanted()
    }

    public func deliver(_ data: ByteBuffer) {
        guard let context = self.context else { return }
        self.credit.received(data.readableBytes)
        var data = data
        do {
            while let output = try self.forwarder.response.next(
                &data,
                clientWantsClose: self.forwarder.clientWantsClose
            ) {
                switch output {
                case .head(let head, let consumed):
                    // The head is written re-encoded: its received bytes are credited as parsed.
                    self.credit.consumedWithoutWrite(consumed)
                    context.write(self.wrapOutboundOut(head), promise: nil)
                    self.notePendingWrite()
                case .body(let bytes):
                    self.credit.handed(bytes.readableBytes)
                    context.write(self.wrapOutboundOut(bytes), promise: nil)
                    self.notePendingWrite()
                case .finished(let closeAfter):
                    self.responseFinished(closeAfter: closeAfter)
                    if self.context == nil { return }
                }
            }
        } catch .bytesAfterResponse {
            // The origin broke HTTP framing. Stop using this stream.
            self.logger.debug("origin sent bytes after a complete response; dropping the connection")
            self.closeClient()
        } catch {
            self.logger.info("origin sent an invalid response: \(error)")
            self.abortClient()
        }
    }

    /// The response is complete: the connection takes the next request, or closes.
    private func responseFinished(closeAfter: Bool) {
        self.flushDelivered()
        if self.forwarder.responseFinished(closeAfter: closeAfter) {
            self.closeClient()
            return
        }
        self.processRequests()
        self.readIfWanted()
    }

    /// Response bytes were written to the socket: have the tunnel flush them when its read burst ends.
    private func notePendingWrite() {
        guard !self.pendingWrites else { return }
        self.pendingWrites = true
        self.stream?.needsFlush(self)
    }

    public func flushDelivered() {
        guard let context = self.context, self.pendingWrites else { return }
        self.pendingWrites = false
        context.flush()
        self.reportWritten()
    }

    /// Returns credit for what the socket took; watches NIO's buffer drain for the rest.
    private func reportWritten() {
        guard let context = self.context else { return }
        let buffered = (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
        let consumed = self.credit.newlyConsumed(buffered: buffered)
        if consumed > 0 { self.stream?.consumed(consumed) }
        if buffered > 0 && !self.credit.watchingDrain {
            self.credit.watchingDrain = true
            let promise = context.eventLoop.makePromise(of: Void.self)
            context.writeAndFlush(self.wrapOutboundOut(ByteBuffer()), promise: promise)
            promise.futureResult.assumeIsolated().whenComplete { result in
                self.credit.watchingDrain = false
                if case .success = result { self.reportWritten() }
            }
        }
    }

    public func peerFinished() {
        self.forwarder.upstreamUnusable()
        do {
            if case .finished(let closeAfter) = try self.forwarder.response.originClosed() {
                // A close-delimited body ends here; so does the application's connection.
                self.responseFinished(closeAfter: closeAfter)
            } else {
                // The origin closed an idle keep-alive connection; the next request opens a new stream.
                self.dropStream()
            }
        } catch {
            self.logger.debug("origin closed in the middle of a response")
            self.abortClient()
        }
    }

    public func streamClosed(reset: ErrorCode?) {
        self.forwarder.upstreamUnusable()
        if case .opening = self.forwarder.state { return }
        if self.forwarder.response.isIdle, self.forwarder.state == .head {
            self.dropStream()  // between exchanges: nothing is lost
        } else {
            self.abortClient()
        }
    }
}

@available(*, unavailable)
extension HTTPForwardHandler: Sendable {}
