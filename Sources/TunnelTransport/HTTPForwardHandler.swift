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
/// An application that leaves is noticed at once: a full close ends the stream (and a request still queued
/// or opening is cancelled), and so does a half-close while a request or response is outstanding, as Squid
/// does by default (`half_closed_clients off`): HTTP/1.1 clients do not half-close to finish a request.
public final class HTTPForwardHandler: ChannelInboundHandler, StreamEndpoint {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private enum RequestState {
        /// Waiting for (the rest of) a request head.
        case head
        /// Waiting for the stream to `target` to open; `pending` holds the request head and what followed.
        case opening(TargetAddress)
        /// Sending a request body upstream.
        case body(HTTPBodyFramer)
        /// The request is sent; the next one waits until the response is complete.
        case awaitingResponse
        /// A CONNECT is being set up; the connection becomes a tunnel once it opens.
        case connecting
        /// Nothing more to read (closing, or turned into a tunnel).
        case done
    }

    private let provider: any TunnelStreamProvider
    private let credentials: ProxyCredentials?
    private var logger: Logger
    private var context: ChannelHandlerContext?

    private var inbound: ByteBuffer
    private var requestState = RequestState.head
    /// The response side: heads re-encoded, bodies passed through by their framing.
    private var response = HTTPResponseRelay()
    /// The request head (origin form) and anything after it, waiting for the stream to open.
    private var pending: ByteBuffer?
    private var pendingMethod = "GET"
    private var clientWantsClose = false
    private var clientEOF = false

    /// The current upstream stream and where it goes.
    private var stream: MuxStream?
    private weak var tunnel: TunnelConnectionHandler?
    private var streamTarget: TargetAddress?
    private var streamUsable = false

    /// Credit accounting: body bytes are handed to the socket as they came, heads are re-encoded (consumed
    /// otherwise).
    private var credit = StreamCreditReporter()
    /// A CONNECT that follows plain requests on this connection, while its stream opens.
    private var connectLocal: LocalStreamHandler?
    private var pendingWrites = false

    init(provider: any TunnelStreamProvider, credentials: ProxyCredentials?, logger: Logger, initialBytes: ByteBuffer) {
        self.provider = provider
        self.credentials = credentials
        self.logger = logger
        self.inbound = initialBytes
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
        var incoming = self.unwrapInboundIn(data)
        self.inbound.writeBuffer(&incoming)
        self.processRequests()
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.readIfWanted()
        context.fireChannelReadComplete()
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            self.clientEOF = true
            switch self.requestState {
            case .head where self.inbound.readableBytes == 0:
                if self.response.isIdle {
                    self.closeClient()
                } else {
                    self.applicationLeft()
                }
            case .connecting:
                break  // the tunnel starts with a FIN once it opens
            case .done:
                break
            case .head, .opening, .body, .awaitingResponse:
                self.applicationLeft()
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
        if case .opening = self.requestState, self.stream == nil { self.provider.cancelStreamRequest(self) }
        self.requestState = .done
        self.dropStream()
        if let local = self.connectLocal {
            self.connectLocal = nil
            local.onOpenResult = nil
            self.provider.cancelStreamRequest(local)
        }
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("HTTP proxy connection error: \(error)")
        self.requestState = .done
        context.close(promise: nil)
    }

    /// Whether the application's socket should be read: while a head is incomplete, or a body can flow.
    public func readIfWanted() {
        guard let context = self.context else { return }
        switch self.requestState {
        case .head:
            if self.inbound.readableBytes < HTTPHeadParser.defaultMaxSize { context.read() }
        case .body:
            if let stream = self.stream, let mux = self.tunnel?.multiplexer, mux.shouldRead(stream) { context.read() }
        case .opening, .awaitingResponse, .connecting, .done:
            break
        }
    }

    private func processRequests() {
        while self.context != nil {
            switch self.requestState {
            case .head:
                guard self.response.isIdle else { return }
                guard self.parseNextRequest() else { return }
            case .body(var framer):
                guard self.inbound.readableBytes > 0, let stream = self.stream, let mux = self.tunnel?.multiplexer
                else { return }
                let count: Int
                do {
                    count = try framer.consume(self.inbound)
                } catch {
                    self.fail(status: 400, message: error.description)
                    return
                }
                if count > 0 { mux.localRead(self.inbound.readSlice(length: count)!, on: stream) }
                if framer.isComplete {
                    self.requestState = .awaitingResponse
                } else {
                    self.requestState = .body(framer)
                    return
                }
            case .opening, .awaitingResponse, .connecting, .done:
                return
            }
        }
    }

    /// Parses one request head; returns false when it has to wait.
    private func parseNextRequest() -> Bool {
        let head: HTTPRequestHead
        do {
            guard let parsed = try HTTPHeadParser.parseRequest(&self.inbound) else {
                if self.clientEOF && self.inbound.readableBytes == 0 { self.closeClient() }
                return false
            }
            head = parsed
        } catch {
            self.fail(status: 400, message: error.description)
            return false
        }
        switch HTTPProxy.decide(head, credentials: self.credentials) {
        case .reject(let status, let message, let authenticate):
            self.fail(status: status, message: message, authenticate: authenticate)
            return false
        case .tunnel(let target):
            self.startTunnel(to: target)
            return false
        case .forward(let target, let rewritten, let body, let closeAfter):
            self.clientWantsClose = closeAfter
            self.pendingMethod = rewritten.method
            self.response.expectResponse(to: rewritten.method)
            let headBytes = rewritten.encoded()
            self.logger.debug("HTTP \(rewritten.method) \(target)\(rewritten.target)")
            if self.streamUsable, self.streamTarget == target, let stream = self.stream,
                let mux = self.tunnel?.multiplexer
            {
                mux.localRead(headBytes, on: stream)
                self.requestState = body == .none ? .awaitingResponse : .body(HTTPBodyFramer(body))
                return true
            }
            // Another host (or no usable stream): a new stream; the old one ends.
            self.dropStream()
            self.pending = headBytes
            self.requestState = .opening(target)
            self.streamTarget = target
            self.pendingBody = body
            self.provider.requestStream(to: target, local: self)
            return false
        }
    }

    private var pendingBody = HTTPBodyFramer.Mode.none

    /// CONNECT on a connection that carried plain requests: it becomes a tunnel to `target`.
    private func startTunnel(to target: TargetAddress) {
        guard let context = self.context else { return }
        self.dropStream()
        self.requestState = .connecting
        let local = LocalStreamHandler()
        let early = self.inbound
        self.inbound = ByteBuffer()
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
            self.requestState = .done
            local.takeOver(from: context, early: early, inputClosed: self.clientEOF)
        }
        _ = context
        self.provider.requestStream(to: target, local: local)
    }

    /// Answers with an error status and closes (after any response in flight).
    private func fail(status: Int, message: String, authenticate: Bool = false) {
        guard let context = self.context else { return }
        self.logger.info("HTTP proxy request refused: \(status) \(message)")
        self.requestState = .done
        self.dropStream()
        context.writeAndFlush(
            self.wrapOutboundOut(HTTPProxy.errorResponse(status: status, message: message, authenticate: authenticate))
        )
        .assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    private func closeClient() {
        guard let context = self.context else { return }
        self.requestState = .done
        self.dropStream()
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer())).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    /// Lets go of the current stream: a finished exchange ends with FIN, anything else is reset.
    private func dropStream() {
        guard let stream = self.stream, let tunnel = self.tunnel else {
            self.stream = nil
            return
        }
        self.stream = nil
        self.streamUsable = false
        self.resetCredit()
        // An idle keep-alive upstream is simply abandoned: the server resets its connection to the origin.
        tunnel.release(stream)
    }

    // MARK: - StreamEndpoint (the upstream)

    public func attach(stream: MuxStream, tunnel: TunnelConnectionHandler) {
        self.stream = stream
        self.tunnel = tunnel
    }

    public func cancelPendingOpen() {
        self.dropStream()
    }

    public func openCompleted(reply: ReplyCode, bound: TargetAddress) {
        guard case .opening = self.requestState, self.context != nil else {
            // Nobody waits for this stream any more (the application left): let it go.
            if reply == .succeeded { self.dropStream() } else { self.stream = nil }
            return
        }
        guard reply == .succeeded, let stream = self.stream, let mux = self.tunnel?.multiplexer, let head = self.pending
        else {
            let (status, _) = HTTPProxy.status(for: reply)
            self.response = HTTPResponseRelay()
            self.fail(status: status, message: "\(reply)")
            return
        }
        self.pending = nil
        self.streamUsable = true
        self.resetCredit()
        mux.localRead(head, on: stream)
        self.requestState = self.pendingBody == .none ? .awaitingResponse : .body(HTTPBodyFramer(self.pendingBody))
        self.processRequests()
        self.readIfWanted()
    }

    public func deliver(_ data: ByteBuffer) {
        guard let context = self.context else { return }
        self.credit.received(data.readableBytes)
        var data = data
        do {
            while let output = try self.response.next(&data, clientWantsClose: self.clientWantsClose) {
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
            self.streamUsable = false
            self.closeClient()
        } catch {
            self.logger.info("origin sent an invalid response: \(error)")
            self.abortClient()
        }
    }

    /// The response is complete: the connection takes the next request, or closes.
    private func responseFinished(closeAfter: Bool) {
        self.flushDelivered()
        if closeAfter || self.clientEOF && self.inbound.readableBytes == 0 {
            self.closeClient()
            return
        }
        if case .awaitingResponse = self.requestState { self.requestState = .head }
        self.processRequests()
        self.readIfWanted()
    }

    /// Response bytes were written to the socket: have the tunnel flush them when its read burst ends.
    private func notePendingWrite() {
        guard !self.pendingWrites else { return }
        self.pendingWrites = true
        self.tunnel?.markNeedsFlush(self)
    }

    private func resetCredit() {
        self.credit.reset()
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
        if consumed > 0, let stream = self.stream, let mux = self.tunnel?.multiplexer {
            mux.consumed(consumed, on: stream, now: .now())
        }
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
        self.streamUsable = false
        do {
            if case .finished(let closeAfter) = try self.response.originClosed() {
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
        self.streamUsable = false
        if case .opening = self.requestState { return }
        if self.isIdle, case .head = self.requestState {
            self.dropStream()  // between exchanges: nothing is lost
        } else {
            self.abortClient()
        }
    }

    private var isIdle: Bool { self.response.isIdle }

    /// The response cannot be completed: reset the application's connection so it sees a failure.
    private func abortClient() {
        guard let context = self.context else { return }
        self.requestState = .done
        self.dropStream()
        context.closeAbortively()
    }
}

@available(*, unavailable)
extension HTTPForwardHandler: Sendable {}
