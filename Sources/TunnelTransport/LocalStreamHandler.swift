import NIOCore
import TunnelEventLoop
import TunnelProtocol

/// The handler on a stream's local socket: the application's connection on the client, the outbound
/// connection on the server. It feeds what the socket reads into the multiplexer (reading only while the
/// stream has credit and room), and writes what the multiplexer delivers, returning credit as writes complete.
///
/// The socket runs with `autoRead` off and `allowRemoteHalfClosure` on: EOF on it becomes the stream's FIN,
/// and the peer's FIN shuts down the socket's output once every byte before it is written.
public final class LocalStreamHandler: ChannelInboundHandler, StreamEndpoint {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// The stream, once opened.
    public private(set) var stream: TunnelStream?
    private var context: ChannelHandlerContext?
    /// The socket when it is our loop's channel, whose buffered bytes are read directly.
    private var ownChannel: EpollStreamChannel?

    /// Client: called once with the OPEN_RESULT.
    public var onOpenResult: ((ReplyCode, TargetAddress) -> Void)?

    /// A CONNECT's relay can be answered early: what it relays is the application's own bytes.
    public var takesEarlyAnswer: Bool { true }

    /// The last delivered buffer, written at flush time (so a batch is one writev).
    private var heldWrite: ByteBuffer?
    private var unflushedBytes = 0
    /// Bytes handed to the socket, and how many were reported consumed. What NIO still buffers is read back
    /// from the channel, so the common case (the socket took everything) needs no promise at all.
    private var credit = StreamCreditReporter()
    private enum Ending { case none, shutdownOutput, close }
    private var ending = Ending.none
    private var outputShut = false
    private var released = false
    private var sawError = false

    public init() {}

    public func attach(_ stream: TunnelStream) {
        self.stream = stream
    }

    // MARK: - Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.ownChannel = context.channel as? EpollStreamChannel
        // The socket may be gone already (an application that reset its connection right after its request,
        // whose reset surfaced while the reply was written): no channelInactive will come for this handler,
        // so the stream is released here, or it would stay open at both ends.
        guard context.channel.isActive else {
            self.releaseStream()
            return
        }
        // The stream may have closed while this handler was being installed.
        if let stream = self.stream, stream.isClosed {
            self.streamClosed(reset: stream.resetCode)
        }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.ownChannel = nil
    }

    /// Starts reading once the stream is open (the runtime calls this after installing the handler).
    public func streamStarted() {
        self.readIfWanted()
    }

    /// Takes the application's connection over from the front-end handler at `context` (SOCKS or HTTP
    /// CONNECT, whose reply is written): bytes the application sent early and an EOF it already sent go
    /// into the stream first, then reading starts.
    func takeOver(from context: ChannelHandlerContext, early: ByteBuffer?, inputClosed: Bool) {
        do {
            try context.pipeline.syncOperations.addHandler(self)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        } catch {
            // The pipeline is closed: the application left while its reply was written.
            context.close(promise: nil)
            self.releaseStream()
            return
        }
        self.start(early: early, inputClosed: inputClosed)
    }

    /// Takes the application's connection over while staying out of the pipeline: the front-end handler at
    /// `context` keeps its place and passes this connection's events on (`LocalProxyHandler` for a CONNECT).
    /// Adding a handler and removing another would cost more than the rest of a connection's set-up.
    func takeOver(hostedAt context: ChannelHandlerContext, early: ByteBuffer?, inputClosed: Bool) {
        self.handlerAdded(context: context)
        guard !self.released else { return }
        self.start(early: early, inputClosed: inputClosed)
    }

    private func start(early: ByteBuffer?, inputClosed: Bool) {
        if let stream = self.stream {
            if let early, early.readableBytes > 0 { stream.send(early) }
            if inputClosed { stream.finish() }
        }
        self.streamStarted()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.stream?.send(self.unwrapInboundIn(data))
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.readIfWanted()
        context.fireChannelReadComplete()
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            self.stream?.finish()
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if self.outputShut && !self.sawError {
            // With our output already shut, NIO turns the socket's EOF straight into a full close (no
            // inputClosed event): that EOF still ends the stream cleanly.
            self.stream?.finish()
        }
        self.releaseStream()
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.sawError = true
        self.stream?.logger?.debug("stream \(self.stream?.id.description ?? "?") local socket error: \(error)")
        self.stream?.reset(code: .cancel)
        context.close(promise: nil)
    }

    private func releaseStream() {
        guard !self.released else { return }
        self.released = true
        self.stream?.release()
    }

    // MARK: - Driven by the tunnel

    /// Reads from the socket if the multiplexer wants more from this stream.
    public func readIfWanted() {
        guard let context = self.context, let stream = self.stream else { return }
        if stream.wantsInput { context.read() }
    }

    public func cancelPendingOpen() {
        self.stream?.release()
    }

    /// Client: the OPEN_RESULT arrived.
    public func openCompleted(reply: ReplyCode, bound: TargetAddress) {
        let callback = self.onOpenResult
        self.onOpenResult = nil
        callback?(reply, bound)
    }

    /// Stream bytes from the peer; written at the next flush.
    public func deliver(_ data: ByteBuffer) {
        guard let context = self.context else { return }
        if let held = self.heldWrite {
            context.write(self.wrapOutboundOut(held), promise: nil)
        } else {
            self.stream?.needsFlush(self)
        }
        self.heldWrite = data
        self.unflushedBytes += data.readableBytes
    }

    /// Writes and flushes what was delivered since the last flush, then returns credit for what the socket took.
    public func flushDelivered() {
        guard let context = self.context, let held = self.heldWrite else { return }
        self.heldWrite = nil
        self.credit.receivedAndHanded(self.unflushedBytes)
        self.unflushedBytes = 0
        context.writeAndFlush(self.wrapOutboundOut(held), promise: nil)
        self.reportWritten()
    }

    /// Bytes still in NIO's outbound buffer (not yet taken by the kernel).
    private var bufferedInChannel: Int {
        if let own = self.ownChannel { return own.bufferedWritableBytes }
        guard let context = self.context else { return 0 }
        return (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
    }

    /// Reports newly written bytes as consumed (credit goes back to the peer); watches for the rest.
    private func reportWritten() {
        let buffered = self.bufferedInChannel
        let consumed = self.credit.newlyConsumed(buffered: buffered)
        if consumed > 0 { self.stream?.consumed(consumed) }
        if buffered > 0 {
            self.watchDrain()
        } else {
            self.finishEndingIfDrained()
        }
    }

    /// The application reads slower than data arrives: learn when NIO's buffer has drained, through an empty
    /// write queued behind the buffered bytes.
    private func watchDrain() {
        guard !self.credit.watchingDrain, let context = self.context else { return }
        self.credit.watchingDrain = true
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(self.wrapOutboundOut(context.channel.allocator.buffer(capacity: 0)), promise: promise)
        promise.futureResult.assumeIsolated().whenComplete { result in
            self.credit.watchingDrain = false
            if case .success = result { self.reportWritten() }
        }
    }

    /// The peer's FIN: shut the socket's output after the bytes before it.
    public func peerFinished() {
        if self.ending == .none { self.ending = .shutdownOutput }
        self.flushDelivered()
        self.finishEndingIfDrained()
    }

    /// The stream is over: abortive close now on RESET, otherwise close once every byte is written.
    public func streamClosed(reset: ErrorCode?) {
        guard let context = self.context else { return }
        if reset != nil {
            self.heldWrite = nil
            context.closeAbortively()
            return
        }
        self.ending = .close
        self.flushDelivered()
        self.finishEndingIfDrained()
    }

    private func finishEndingIfDrained() {
        guard let context = self.context, self.heldWrite == nil, self.bufferedInChannel == 0 else { return }
        switch self.ending {
        case .none:
            return
        case .shutdownOutput:
            guard !self.outputShut else { return }
            self.outputShut = true
            context.close(mode: .output, promise: nil)
        case .close:
            context.close(promise: nil)
        }
    }
}

@available(*, unavailable)
extension LocalStreamHandler: Sendable {}
