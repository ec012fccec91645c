import Logging
import NIOCore
import TunnelCrypto
import TunnelProtocol

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The one handler on a tunnel TCP connection: record framing, the Noise handshake, the record layer (seal,
/// open, rekey, authenticated close) and the stream multiplexer, driven from the channel's events.
///
/// All protocol decisions live in the pure state machines it owns (`ClientHandshakeStateMachine` /
/// `ServerHandshakeStateMachine`, `RecordSealer`, `RecordOpener`, `Multiplexer`); this class carries out
/// their I/O. Every stream's local socket lives on this channel's event loop, so nothing here locks.
public final class TunnelConnectionHandler: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// Timers and sizes of one connection: the session's (each default written once, there) and how this
    /// handler writes.
    public struct Configuration: Sendable {
        /// The session's: multiplexer, rekey policy, timers, handshake limit, the features it wants.
        public var session = TunnelSession.Configuration()
        /// Bytes of records built per flush before handing them to the socket.
        public var outputBatchBytes = 256 << 10
        /// After CLOSE is queued, how long the peer has to take what is still unsent before the connection is
        /// cut (a peer that reads nothing must not keep a stopping process alive).
        public var closeTimeout: TimeAmount = .seconds(1)
        public init() {}

        /// Multiplexer windows and limits.
        public var multiplexer: Multiplexer.Configuration {
            get { self.session.multiplexer }
            set { self.session.multiplexer = newValue }
        }
        /// When each sending direction rekeys.
        public var rekeyPolicy: RekeyPolicy {
            get { self.session.rekeyPolicy }
            set { self.session.rekeyPolicy = newValue }
        }
        /// The whole handshake must finish within this time.
        public var handshakeTimeout: TimeAmount {
            get { self.session.timers.handshakeTimeout }
            set { self.session.timers.handshakeTimeout = newValue }
        }
        /// A PING goes out after this long without receiving anything.
        public var keepaliveInterval: TimeAmount {
            get { self.session.timers.keepaliveInterval }
            set { self.session.timers.keepaliveInterval = newValue }
        }
        /// The connection is declared dead after this long without receiving anything.
        public var deadTimeout: TimeAmount {
            get { self.session.timers.deadTimeout }
            set { self.session.timers.deadTimeout = newValue }
        }
        /// Largest handshake message accepted.
        public var maxHandshakeMessage: Int {
            get { self.session.maxHandshakeMessage }
            set { self.session.maxHandshakeMessage = newValue }
        }
        /// Client: ask for compression. Server: allow it when asked. Used only if both sides want it.
        public var compression: Bool {
            get { self.session.compression }
            set { self.session.compression = newValue }
        }
        /// Client: ask for full-tunnel mode (IP packets). Server: allow it (it has a TUN device).
        public var fullTunnel: Bool {
            get { self.session.fullTunnel }
            set { self.session.fullTunnel = newValue }
        }
    }

    /// Which side of the handshake this connection runs.
    public enum Role {
        case client(ClientHandshakeStateMachine)
        case server(ServerHandshakeStateMachine)
    }

    public let configuration: Configuration
    public var logger: Logger
    /// Held strongly until the connection goes inactive (the runtime keeps no other reference to per-connection delegates).
    public var delegate: (any TunnelConnectionDelegate)?
    /// The session: handshake, records, multiplexer and timers, as a value with no channel. This handler only
    /// moves its bytes and acts on what it reports.
    public let core: TunnelSession
    private var phase: TunnelSession.Phase { self.core.phase }
    private var context: ChannelHandlerContext?
    /// The stream multiplexer, once the handshake has finished.
    public var multiplexer: Multiplexer? { self.core.multiplexer }
    /// The session the handshake established.
    public var session: EstablishedSession? { self.core.established }

    /// The last small output buffer, reused once the socket has written it.
    private var outputScratch: ByteBuffer?
    private var flushScheduled = false
    /// Set while `enqueueIPPacket` queues: output waits for the caller's `flushNow()` instead of a task.
    private var flushHeld = false
    /// Output was queued under `flushHeld` and not flushed yet.
    private var flushOwed = false
    private var streamsToFlush: [any StreamEndpoint] = []
    /// Wakes the session's timers.
    private var timer: Scheduled<Void>?
    private var closeError: ProtocolError?
    /// The code of the peer's authenticated CLOSE, once it came (why the peer ended the tunnel).
    public private(set) var peerCloseCode: ErrorCode?
    /// Writes records, with send(2) itself once `enableDirectWrites()` found the socket.
    private let writer = DirectSocketWriter()
    private var drainDeadline: NIODeadline?
    private var drainCompletion: (() -> Void)?
    /// Remote address, for logs.
    public private(set) var remoteDescription = "?"
    /// The peer's IP address alone (a reconnect from the same host comes from another port).
    public private(set) var remoteAddressWithoutPort = "?"

    public init(role: Role, configuration: Configuration = Configuration(), logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        let sessionRole: TunnelSession.Role =
            switch role {
            case .client(let machine): .client(machine)
            case .server(let machine): .server(machine)
            }
        self.core = TunnelSession(role: sessionRole, configuration: configuration.session, now: .now())
        self.core.delegate = self
        self.core.multiplexerDelegate = self
    }

    // MARK: - Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if let remote = context.channel.remoteAddress {
            self.remoteDescription = remote.hostPortDescription
            self.remoteAddressWithoutPort =
                remote.unmappedBytes.flatMap { IPAddress(bytes: $0) }?.description ?? remote.description
        }
        if context.channel.isActive { self.start(context: context) }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.context = nil
    }

    public func channelActive(context: ChannelHandlerContext) {
        if let remote = context.channel.remoteAddress {
            self.remoteDescription = remote.hostPortDescription
            self.remoteAddressWithoutPort =
                remote.unmappedBytes.flatMap { IPAddress(bytes: $0) }?.description ?? remote.description
        }
        self.start(context: context)
        context.fireChannelActive()
    }

    private var started = false

    private func start(context: ChannelHandlerContext) {
        guard !self.started else { return }
        self.started = true
        self.core.isWritable = context.channel.isWritable
        do {
            try self.core.start(now: .now(), wallClock: wallClockNanoseconds())
        } catch {
            self.fail(error, context: context)
            return
        }
        self.armTimer(context: context)
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.core.noteReceive(now: .now())
        guard self.phase != .closed else { return }
        defer { self.delegate?.tunnelReadFinished(self) }
        do {
            try self.core.received(self.unwrapInboundIn(data))
        } catch {
            self.fail(error, context: context)
            return
        }
        // Hand what this read delivered to the local sockets now rather than after the whole read burst: a
        // small reply behind a bulk transfer should not wait for a megabyte of other streams' records.
        self.flushLocalStreams()
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.flushLocalStreams()
        context.fireChannelReadComplete()
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        let writable = context.channel.isWritable
        self.core.isWritable = writable
        self.multiplexer?.tunnelWritabilityChanged(writable)
        if writable { self.produceOutput(context: context) }
        context.fireChannelWritabilityChanged()
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            // TCP EOF. Without a CLOSE before it, this is truncation.
            if self.phase == .handshaking {
                self.fail(
                    ProtocolError.handshakeRejected("the peer closed the connection during the handshake"),
                    context: context
                )
            } else if self.phase != .closed {
                self.fail(ProtocolError.truncated("connection closed by peer without CLOSE"), context: context)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.writer.disable()
        if self.phase != .closed {
            let error =
                self.phase == .handshaking
                ? ProtocolError.handshakeRejected("the peer closed the connection during the handshake")
                : ProtocolError.truncated("connection lost without CLOSE")
            self.closeError = error
            self.core.abort(code: .internalError)
        }
        self.flushLocalStreams()
        self.delegate?.tunnelClosed(self, error: self.closeError)
        self.delegate = nil
        if let completion = self.drainCompletion {
            self.drainCompletion = nil
            completion()
        }
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if self.phase == .handshaking {
            self.fail(
                ProtocolError.handshakeRejected("the peer reset the connection during the handshake (\(error))"),
                context: context
            )
        } else if self.phase != .closed {
            self.fail(ProtocolError.truncated("socket error: \(error)"), context: context)
        }
    }

    // MARK: - Outbound records

    private func scheduleFlush() {
        if self.flushHeld {
            self.flushOwed = true
            return
        }
        guard !self.flushScheduled, let context = self.context else { return }
        self.flushScheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.flushScheduled = false
            if let context = self.context { self.produceOutput(context: context) }
        }
    }

    /// Builds records from whatever the multiplexer has queued, up to the batch size, and writes them in one go.
    private func produceOutput(context: ChannelHandlerContext) {
        self.flushOwed = false
        let maxPlaintext = WireLimits.maxRecordFrameBytes
        while self.core.hasOutput && context.channel.isWritable {
            let estimate = self.core.queuedOutputBytes
            let capacity =
                min(self.configuration.outputBatchBytes, estimate + 64 * (estimate / maxPlaintext + 1)) + 2 + 16
            var buffer = TunnelSession.reuse(&self.outputScratch, capacity: capacity)
            let rekeys = self.core.sendRekeys
            do {
                try self.core.produceRecords(
                    into: &buffer,
                    batchBytes: self.configuration.outputBatchBytes,
                    now: .now()
                )
            } catch {
                self.fail(error, context: context)
                return
            }
            for _ in rekeys..<self.core.sendRekeys { self.logger.debug("rekeyed sending direction") }
            guard buffer.readableBytes > 0 else { break }
            TunnelSession.keep(buffer, in: &self.outputScratch)
            self.send(buffer, context: context)
        }
        self.checkDrained()
    }

    /// Writes `buffer` to the socket (directly when allowed: `DirectSocketWriter`).
    private func send(_ buffer: ByteBuffer, context: ChannelHandlerContext) {
        self.writer.write(buffer, context: context)
    }

    private func flushLocalStreams() {
        guard !self.streamsToFlush.isEmpty else { return }
        let streams = self.streamsToFlush
        self.streamsToFlush.removeAll(keepingCapacity: true)
        for local in streams { local.flushDelivered() }
    }

    public func markNeedsFlush(_ local: any StreamEndpoint) {
        self.streamsToFlush.append(local)
    }

    // MARK: - Timers

    private func armTimer(context: ChannelHandlerContext) {
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: self.core.timers.tickInterval) {
            guard let context = self.context else { return }
            self.timerFired(context: context)
        }
    }

    private func timerFired(context: ChannelHandlerContext) {
        guard self.phase != .closed else { return }
        do {
            try self.core.tick(now: .now())
        } catch {
            self.fail(error, context: context)
            return
        }
        if self.flushOwed {
            // A packet queued with `enqueueIPPacket` was never followed by `flushNow()`: a caller's bug, but the
            // packets still go.
            self.produceOutput(context: context)
        }
        self.armTimer(context: context)
    }

    // MARK: - Closing

    /// Graceful shutdown: GOAWAY now, then CLOSE once every stream has finished or `timeout` passed.
    public func shutdown(drainTimeout timeout: TimeAmount, completion: @escaping () -> Void) {
        guard let context = self.context, self.phase == .established, let mux = self.multiplexer else {
            completion()
            if let context = self.context, self.phase != .closed { self.close(code: .shutdown, context: context) }
            return
        }
        self.drainCompletion = completion
        self.drainDeadline = .now() + timeout
        mux.goAway(code: .shutdown)
        context.eventLoop.assumeIsolated().scheduleTask(in: timeout) {
            guard let context = self.context, self.phase == .established, self.drainDeadline != nil else { return }
            self.logger.info("drain timeout: closing with \(self.multiplexer?.streamCount ?? 0) streams still open")
            self.close(code: .shutdown, context: context)
        }
        self.produceOutput(context: context)
    }

    private func checkDrained() {
        guard self.drainDeadline != nil, let context = self.context, let mux = self.multiplexer else { return }
        if mux.streamCount == 0 { self.close(code: .noError, context: context) }
    }

    /// Ends the connection with an authenticated CLOSE (after any queued records), aborting open streams.
    public func close(code: ErrorCode) {
        guard let context = self.context else { return }
        self.close(code: code, context: context)
    }

    private func close(code: ErrorCode, context: ChannelHandlerContext) {
        guard self.phase == .established else {
            if self.phase == .handshaking {
                self.core.abort(code: .shutdown)
                context.close(promise: nil)
            }
            return
        }
        self.drainDeadline = nil
        self.produceOutput(context: context)
        self.timer?.cancel()
        var buffer = context.channel.allocator.buffer(capacity: 64)
        do {
            try self.core.close(code: code, into: &buffer)
        } catch {
            context.close(promise: nil)
            return
        }
        let completion = self.drainCompletion
        self.drainCompletion = nil
        // Cut the connection if the peer does not take the CLOSE (and what is queued before it) in time; the
        // write then fails, and the completion below runs all the same.
        let remote = self.remoteDescription
        let logger = self.logger
        let cut = context.eventLoop.assumeIsolated().scheduleTask(in: self.configuration.closeTimeout) {
            logger.info("\(remote) did not take the end of the tunnel within the close timeout: cutting the connection")
            context.closeAbortively()
        }
        self.writer.writeThroughChannel(buffer, context: context).assumeIsolated().whenComplete { _ in
            cut.cancel()
            context.close(promise: nil)
            completion?()
        }
    }

    private func peerClosed(code: ErrorCode, context: ChannelHandlerContext) {
        self.logger.info("peer closed the tunnel (\(code))")
        self.peerCloseCode = code
        self.timer?.cancel()
        self.core.abort(code: code == .noError ? .shutdown : code)
        self.flushLocalStreams()
        context.close(promise: nil)
    }

    /// Ends the connection after a failure: streams are reset, nothing more is sent.
    private func fail(_ error: ProtocolError, context: ChannelHandlerContext) {
        guard self.phase != .closed else { return }
        let wasHandshaking = self.phase == .handshaking
        self.closeError = error
        self.timer?.cancel()
        self.core.abort(code: .internalError)
        self.flushLocalStreams()
        if wasHandshaking {
            // The client's tunnel manager reports its own failures, with advice; the server's delegate logs
            // each one (throttled per source).
            if !self.core.isClient {
                if self.delegate?.tunnelHandshakeFailed(self, error: error) != true {
                    self.logger.info("handshake with \(self.remoteDescription) failed: \(error.detail)")
                }
            } else {
                self.logger.debug("handshake with \(self.remoteDescription) failed: \(error.detail)")
            }
        } else {
            self.logger.info("tunnel with \(self.remoteDescription) ended: \(error.detail)")
        }
        // Abortive close: the peer sees a reset, never a clean end it could mistake for a CLOSE.
        context.closeAbortively()
        if let completion = self.drainCompletion {
            self.drainCompletion = nil
            completion()
        }
    }

    // MARK: - Streams (used by the runtime and the local handlers)

    /// Client: opens a stream to `target` for `local`; the result arrives through `local.openCompleted`.
    /// Returns false when this connection cannot open a stream now.
    public func openStream(to target: TargetAddress, kind: StreamKind = .tcp, local: any StreamEndpoint) -> Bool {
        guard self.phase == .established, let mux = self.multiplexer,
            let stream = mux.openStream(to: target, kind: kind)
        else {
            return false
        }
        local.attach(stream: stream, tunnel: self)
        stream.context = local
        return true
    }

    /// Whether this connection has used up its stream ids (it can only drain).
    public var streamIDsExhausted: Bool { self.multiplexer?.streamIDsExhausted ?? false }

    /// Whether `openStream` would succeed now.
    public var canOpenStream: Bool {
        self.phase == .established && self.drainDeadline == nil && (self.multiplexer?.canOpenStream ?? false)
    }

    /// Server: answers an OPEN once the outbound connection succeeded or failed.
    public func completeOpen(_ stream: MuxStream, reply: ReplyCode, bound: TargetAddress) {
        self.multiplexer?.completeOpen(stream, reply: reply, bound: bound)
    }

    /// Server: binds a stream to the handler of its outbound socket.
    public func attach(_ local: any StreamEndpoint, to stream: MuxStream) {
        local.attach(stream: stream, tunnel: self)
        stream.context = local
    }

    /// A stream's local socket is gone: the stream leaves the table.
    public func release(_ stream: MuxStream) {
        guard let mux = self.multiplexer else { return }
        mux.release(stream)
        self.delegate?.tunnelStreamReleased(self)
        self.checkDrained()
    }

    /// The connection's event loop (while attached to a channel).
    public var eventLoop: (any EventLoop)? { self.context?.eventLoop }

    /// Whether this connection compresses stream data (negotiated).
    public var compressionActive: Bool { self.multiplexer?.configuration.compression ?? false }

    /// Whether the tunnel is up.
    public var isEstablished: Bool { self.phase == .established }

    // MARK: - Full tunnel

    /// Lets this connection write records to its socket with send(2) itself instead of through the channel's
    /// write path whenever the channel holds no earlier write: a few microseconds less per write on the
    /// latency path (the full tunnel's packets). Finds the socket's descriptor by its addresses (a scan of
    /// the process's descriptors, so once per connection); does nothing if it cannot. Returns whether it is on.
    @discardableResult
    public func enableDirectWrites() -> Bool {
        guard self.phase == .established, let channel = self.context?.channel else { return self.writer.isEnabled }
        return self.writer.enable(channel: channel)
    }

    /// Whether IP packets flow on this connection (negotiated).
    public var fullTunnelActive: Bool { self.multiplexer?.configuration.fullTunnel ?? false }

    /// Queues one IP packet for the peer; false when it was dropped (queue full, or not a full tunnel).
    @discardableResult
    public func sendIPPacket(_ packet: ByteBuffer) -> Bool {
        guard self.phase == .established, let mux = self.multiplexer else { return false }
        return mux.sendIPPacket(packet)
    }

    /// Queues one IP packet like `sendIPPacket` but without scheduling a flush for it: the caller (a TUN
    /// reader, handing over a read burst) calls `flushNow()` before this event-loop tick ends. One task per
    /// packet less on the latency path.
    @discardableResult
    public func enqueueIPPacket(_ packet: ByteBuffer) -> Bool {
        guard self.phase == .established, let mux = self.multiplexer else { return false }
        self.flushHeld = true
        defer { self.flushHeld = false }
        return mux.sendIPPacket(packet)
    }

    /// Builds and writes records for whatever is queued now, instead of at the end of this event-loop tick
    /// (a TUN reader calls it when its read burst is over: the packets go out without another turn of the
    /// loop).
    public func flushNow() {
        guard let context = self.context else { return }
        self.produceOutput(context: context)
    }

    /// IP packets dropped because the send queue was full.
    public var droppedPackets: Int { self.multiplexer?.droppedPackets ?? 0 }

    /// Sends a CONTROL frame ahead of stream data.
    public func sendControl(_ payload: ByteBuffer) {
        guard self.phase == .established, let mux = self.multiplexer else { return }
        mux.sendControl(payload)
    }
}

extension TunnelConnectionHandler: MultiplexerDelegate {
    public func multiplexer(_ mux: Multiplexer, openRequested stream: MuxStream) {
        self.logger.debug("stream \(stream.id) requested to \(stream.target)")
        if let delegate = self.delegate {
            delegate.tunnel(self, openRequested: stream)
        } else {
            mux.completeOpen(stream, reply: .generalFailure, bound: .unspecified)
        }
    }

    public func multiplexer(_ mux: Multiplexer, openCompleted stream: MuxStream, reply: ReplyCode, bound: TargetAddress)
    {
        guard let local = stream.context as? any StreamEndpoint else { return }
        self.logger.debug("stream \(stream.id) to \(stream.target): \(reply)")
        local.openCompleted(reply: reply, bound: bound)
    }

    public func multiplexer(_ mux: Multiplexer, received data: ByteBuffer, on stream: MuxStream) {
        stream.context?.deliver(data)
    }

    public func multiplexer(_ mux: Multiplexer, receivedEndOfStream stream: MuxStream) {
        stream.context?.peerFinished()
    }

    public func multiplexer(_ mux: Multiplexer, streamClosed stream: MuxStream, reset: ErrorCode?) {
        if let reset { self.logger.debug("stream \(stream.id) to \(stream.target) reset: \(reset)") }
        guard let context = stream.context else {
            // No local socket (yet): nothing to close; the stream leaves the table now unless a connect is
            // still running, which checks the state when it finishes.
            return
        }
        context.streamClosed(reset: reset)
    }

    public func multiplexer(_ mux: Multiplexer, streamWantsRead stream: MuxStream) {
        stream.context?.readIfWanted()
    }

    public func multiplexer(_ mux: Multiplexer, peerGoingAway lastStreamID: StreamID, code: ErrorCode) {
        self.logger.info("peer is going away (\(code)); no new streams on this tunnel")
        self.delegate?.tunnelPeerGoingAway(self)
    }

    public func multiplexerHasOutput(_ mux: Multiplexer) {
        self.scheduleFlush()
    }

    public func multiplexer(_ mux: Multiplexer, receivedIPPacket packet: ByteBuffer) {
        self.delegate?.tunnel(self, receivedIPPacket: packet)
    }

    public func multiplexer(_ mux: Multiplexer, receivedControl payload: ByteBuffer) throws(ProtocolError) {
        try self.delegate?.tunnel(self, receivedControl: payload)
    }
}

@available(*, unavailable)
extension TunnelConnectionHandler: Sendable {}

/// Wall-clock time for handshake timestamps (monotonic time cannot order handshakes across restarts).
func wallClockNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return UInt64(max(0, ts.tv_sec)) * 1_000_000_000 + UInt64(max(0, ts.tv_nsec))
}

extension TunnelConnectionHandler: TunnelSessionDelegate {
    public func sessionAuthorize(_ key: PublicKey) -> Bool {
        self.delegate?.tunnelAuthorize(key) ?? false
    }

    public func sessionCheckReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict {
        self.delegate?.tunnelCheckReplay(key: key, timestamp: timestamp) ?? .replay
    }

    public func session(_ session: TunnelSession, send message: ByteBuffer) {
        guard let context = self.context else { return }
        self.send(message, context: context)
    }

    public func session(_ session: TunnelSession, established: EstablishedSession) {
        self.delegate?.tunnelEstablished(self, session: established)
    }

    public func sessionConfirmed(_ session: TunnelSession) {
        self.delegate?.tunnelConfirmed(self)
    }

    public func session(_ session: TunnelSession, peerClosed code: ErrorCode) {
        guard let context = self.context else { return }
        self.peerClosed(code: code, context: context)
    }
}
