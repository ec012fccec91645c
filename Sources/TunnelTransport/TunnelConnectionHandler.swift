import Logging
import NIOCore
import TunnelCrypto
import TunnelEventLoop
import TunnelProtocol

#if canImport(Glibc)
import Glibc
#endif

/// The one handler on a tunnel TCP connection: events in, actions out. Every protocol decision (handshake,
/// records, rekey, multiplexing, timers, drain) is its `TunnelSession`'s, a value with no channel; this class
/// feeds it the socket's bytes and the clock, writes the records it produces, wakes it when its next tick is
/// due, and carries out the end it calls for (CLOSE, or an abortive close on failure). Every stream's local
/// socket lives on this channel's event loop, so nothing here locks. The side toward the runtime and the
/// stream endpoints is in `TunnelConnectionHandler+Events.swift`.
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
    }

    /// Which side of the handshake this connection runs.
    public typealias Role = TunnelSession.Role

    public let configuration: Configuration
    public var logger: Logger
    /// Held strongly until the connection goes inactive (the runtime keeps no other reference to per-connection delegates).
    public var delegate: (any TunnelConnectionDelegate)?
    /// The session: handshake, records, multiplexer and timers, as a value with no channel. This handler only
    /// moves its bytes and acts on what it reports.
    public let core: TunnelSession
    var phase: TunnelSession.Phase { self.core.phase }
    private(set) var context: ChannelHandlerContext?
    /// The stream multiplexer, once the handshake has finished.
    public var multiplexer: Multiplexer? { self.core.multiplexer }
    /// The session the handshake established.
    public var session: EstablishedSession? { self.core.established }

    /// How much output may wait below the multiplexer (the kernel's unsent bytes, the channel's buffer).
    private let sendQueue = SocketSendQueue()
    /// The last small output buffer, reused once the socket has written it.
    private var outputScratch: ByteBuffer?
    private var flushScheduled = false
    /// Streams opened with early data whose applications are still to be told "succeeded" (fast open), in
    /// opening order: by `sendOpensNow()`, or by the task queued with the first of them.
    var earlyAnswers: [(MuxStream, any StreamEndpoint)] = []
    var earlyAnswersScheduled = false
    /// Set while `enqueueIPPacket` queues: output waits for the caller's `flushNow()` instead of a task.
    var flushHeld = false
    /// Output was queued under `flushHeld` and not flushed yet.
    private var flushOwed = false
    private var streamsToFlush: [any MuxStreamContext] = []
    /// A tunnel read is being processed: its end flushes what it delivered.
    private var inRead = false
    /// A flush of deliveries made outside a read is queued on the loop.
    private var localFlushScheduled = false
    /// Wakes the session's timers.
    private var timer: Scheduled<Void>?
    var closeError: ProtocolError?
    /// The code of the peer's authenticated CLOSE, once it came (why the peer ended the tunnel).
    public private(set) var peerCloseCode: ErrorCode?
    /// The socket's descriptor, when whoever made the socket knows it (it was handed to NIO connected).
    public var socketDescriptor: Int32?
    /// Writes records, with send(2) itself once `enableDirectWrites()` found the socket.
    let writer = DirectSocketWriter()
    /// CLOSE is being written.
    private var closing = false
    /// Runs once the drain that `shutdown` began is over.
    private var drainCompletion: (() -> Void)?
    /// Bytes of this session read from and written to its connections (records and handshakes, as on the
    /// wire: with compression, fewer than the streams carried).
    public private(set) var wireBytesReceived = 0
    public var wireBytesSent: Int { self.writer.bytesWritten }
    /// When the session was established (its first connection's handshake), and when its current connection
    /// was (nil while detached or handshaking).
    public internal(set) var establishedAt: NIODeadline?
    public internal(set) var connectedAt: NIODeadline?
    /// The connection's round-trip time: the tunnel's own PING measure where this end sends them (the
    /// client), else the kernel's estimate for the socket (status; a system call, not for the data path).
    public var roundTrip: TimeAmount? {
        if let measured = self.multiplexer?.smoothedRoundTrip { return measured }
        guard let channel = self.context?.channel, let info = TCPInfo.of(channel) else { return nil }
        return .microseconds(Int64(info.roundTripMicroseconds))
    }
    /// Called with each new RTT sample (metrics), after the read that brought it.
    public var roundTripObserver: ((TimeAmount) -> Void)?
    private var samplesSeen = 0
    /// Remote address, for logs.
    public private(set) var remoteDescription = "?"
    /// The peer's IP address alone (a reconnect from the same host comes from another port).
    public private(set) var remoteAddressWithoutPort = "?"

    public init(role: Role, configuration: Configuration = Configuration(), logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        self.core = TunnelSession(role: role, configuration: configuration.session, now: .now())
        self.core.delegate = self
        self.core.multiplexerDelegate = self
    }

    // MARK: - Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.sendQueue.resume = { [weak self] in
            if let self, let context = self.context { self.produceOutput(context: context) }
        }
        if context.channel.isActive { self.start(context: context) }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        // A session that left a broken connection may be on another one by now.
        guard context === self.context else { return }
        self.timer?.cancel()
        self.context = nil
    }

    public func channelActive(context: ChannelHandlerContext) {
        self.start(context: context)
        context.fireChannelActive()
    }

    private var started = false

    private func start(context: ChannelHandlerContext) {
        guard !self.started else { return }
        self.started = true
        if let remote = context.channel.remoteAddress {
            self.remoteDescription = remote.hostPortDescription
            self.remoteAddressWithoutPort =
                remote.unmappedBytes.flatMap { IPAddress(bytes: $0) }?.description ?? remote.description
        }
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
        guard context === self.context else { return }
        self.core.noteReceive(now: .now())
        guard self.phase != .closed else { return }
        defer { self.delegate?.tunnelReadFinished(self) }
        self.inRead = true
        let bytes = self.unwrapInboundIn(data)
        self.wireBytesReceived += bytes.readableBytes
        do {
            try self.core.received(bytes)
        } catch {
            self.inRead = false
            self.fail(error, context: context)
            return
        }
        self.inRead = false
        if let observer = self.roundTripObserver, let mux = self.multiplexer, mux.roundTripSamples != self.samplesSeen {
            self.samplesSeen = mux.roundTripSamples
            observer(mux.lastRoundTrip)
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
        // A connection the session left (it resumed over another) no longer speaks for the session's output:
        // its buffer emptying as it closes must not send records into it.
        guard context === self.context else {
            context.fireChannelWritabilityChanged()
            return
        }
        let writable = context.channel.isWritable
        self.core.isWritable = writable
        self.multiplexer?.tunnelWritabilityChanged(writable)
        if writable { self.produceOutput(context: context) }
        context.fireChannelWritabilityChanged()
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard context === self.context else { return }
        if let event = event as? ChannelEvent, event == .inputClosed {
            // TCP EOF. Without a CLOSE before it, this is truncation.
            self.fail(self.lost("closed the connection"), context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        guard context === self.context else {
            context.fireChannelInactive()
            return
        }
        self.timer?.cancel()
        self.writer.disable()
        if self.phase != .closed {
            if self.detachIfResumable(self.lost("closed the connection"), context: context) {
                context.fireChannelInactive()
                return
            }
            self.closeError = self.lost("closed the connection")
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
        guard context === self.context else { return }
        self.fail(self.lost("reset the connection (\(error))"), context: context)
    }

    /// The connection broke (`error`: it ended, was reset, or went silent; or a reconnect failed): a
    /// resumable session leaves it with its streams for another (docs/PROTOCOL.md §7). Returns false when the
    /// session cannot be kept.
    private func detachIfResumable(_ error: ProtocolError, context: ChannelHandlerContext) -> Bool {
        guard error.code == .truncated || self.core.isReconnecting, self.core.detach() else { return false }
        self.leave(context)
        self.flushLocalStreams()
        self.connectedAt = nil
        self.delegate?.tunnelDetached(self, error: error)
        return true
    }

    /// The detached session leaves `context`'s channel (cut, if still open); its events are no longer ours.
    private func leave(_ context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.writer.disable()
        self.started = false
        self.context = nil
        if context.channel.isActive { context.closeAbortively() }
    }

    /// The error for a connection that ended below the protocol (EOF, reset) in the current phase.
    private func lost(_ what: String) -> ProtocolError {
        self.phase == .handshaking
            ? .handshakeRejected("the peer \(what) during the handshake") : .truncated("the peer \(what) without CLOSE")
    }

    // MARK: - Outbound records

    /// Writes the records queued so far now instead of in the task `scheduleFlush` queued (which then finds
    /// nothing to write). Only outside a tunnel read, whose own end writes.
    func flushIfPending() {
        guard self.flushScheduled, !self.flushHeld, !self.inRead, let context = self.context else { return }
        self.produceOutput(context: context)
    }

    func scheduleFlush() {
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
    func produceOutput(context: ChannelHandlerContext) {
        self.flushOwed = false
        guard self.core.hasOutput else {
            self.closeIfDrained()
            return
        }
        let maxPlaintext = WireLimits.maxRecordFrameBytes
        let now = NIODeadline.now()
        // Each write at most what may wait below the scheduler: the rest stays in the multiplexer, whose
        // order decides what goes next.
        while self.core.hasOutput && context.channel.isWritable {
            guard
                let batchBytes = self.sendQueue.allowance(
                    wanted: self.configuration.outputBatchBytes,
                    queued: self.core.queuedOutputBytes,
                    channel: context.channel
                )
            else { break }
            let estimate = self.core.queuedOutputBytes
            let capacity = min(batchBytes, estimate + 64 * (estimate / maxPlaintext + 1)) + 2 + 16
            var buffer = TunnelSession.reuse(&self.outputScratch, capacity: capacity)
            let rekeys = self.core.sendRekeys
            do {
                try self.core.produceRecords(
                    into: &buffer,
                    batchBytes: batchBytes,
                    recordBytes: batchBytes,
                    now: now
                )
            } catch {
                self.fail(error, context: context)
                return
            }
            for _ in rekeys..<self.core.sendRekeys { self.logger.debug("rekeyed sending direction") }
            guard buffer.readableBytes > 0 else { break }
            TunnelSession.keep(buffer, in: &self.outputScratch)
            self.sendQueue.wrote(buffer.readableBytes)
            self.writer.write(buffer, context: context)
        }
        // The rate is read after the writes, off the latency path (a ping waits for no system call).
        self.sendQueue.measureIfDue(channel: context.channel, now: now)
        self.closeIfDrained()
    }

    private func flushLocalStreams() {
        guard !self.streamsToFlush.isEmpty else { return }
        let streams = self.streamsToFlush
        self.streamsToFlush.removeAll(keepingCapacity: true)
        for local in streams { local.flushDelivered() }
    }

    public func markNeedsFlush(_ local: any MuxStreamContext) {
        self.streamsToFlush.append(local)
        // Inside a read, its end flushes. A delivery outside one (a stream's early data handed on when it
        // opens, datagrams that waited for a name) is flushed once the current task is done.
        guard !self.inRead, !self.localFlushScheduled, let loop = self.context?.eventLoop else { return }
        self.localFlushScheduled = true
        loop.assumeIsolated().execute {
            self.localFlushScheduled = false
            self.flushLocalStreams()
        }
    }

    // MARK: - Timers

    private func armTimer(context: ChannelHandlerContext) {
        self.timer?.cancel()
        let deadline = self.core.nextTick(after: .now())
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            guard let context = self.context else { return }
            self.timerFired(context: context)
        }
    }

    private func timerFired(context: ChannelHandlerContext) {
        guard self.phase != .closed else { return }
        let now = NIODeadline.now()
        do {
            try self.core.tick(now: now)
        } catch {
            self.fail(error, context: context)
            return
        }
        if self.closeIfDrained(now: now) { return }
        if self.flushOwed {
            // A packet queued with `enqueueIPPacket` was never followed by `flushNow()`: a caller's bug, but the
            // packets still go.
            self.produceOutput(context: context)
        }
        self.armTimer(context: context)
    }

    // MARK: - Closing

    /// Graceful shutdown: GOAWAY now, then CLOSE once every stream has finished or `timeout` passed
    /// (the session decides: `TunnelSession.beginDrain`); `completion` runs when the connection is over.
    public func shutdown(drainTimeout timeout: TimeAmount, completion: @escaping () -> Void) {
        if self.core.isDetached {
            self.abandon(code: .shutdown, why: "stopping")
            completion()
            return
        }
        guard let context = self.context, self.core.beginDrain(deadline: .now() + timeout) else {
            completion()
            if let context = self.context, self.phase != .closed { self.close(code: .shutdown, context: context) }
            return
        }
        if let earlier = self.drainCompletion {
            self.drainCompletion = {
                earlier()
                completion()
            }
        } else {
            self.drainCompletion = completion
        }
        self.armTimer(context: context)
        self.produceOutput(context: context)
    }

    /// Sends CLOSE if a drain is over (its last stream finished, or its deadline passed). Returns whether
    /// it closed.
    @discardableResult
    func closeIfDrained(now: NIODeadline? = nil) -> Bool {
        guard self.core.isDraining, !self.closing, let context = self.context,
            let code = self.core.drainCloseDue(now: now ?? .now())
        else { return false }
        if code != .noError {
            self.logger.info("drain timeout: closing with \(self.multiplexer?.streamCount ?? 0) streams still open")
        }
        self.close(code: code, context: context)
        return true
    }

    /// Server: a second descriptor of this connection's socket (close-on-exec), for the resumed session that
    /// takes the connection over on its own event loop; nil when the socket cannot be found.
    public func duplicateSocket() -> Int32? {
        // On our own loop the channel hands it out (and takes the socket out of its loop when it closes).
        if let own = self.context?.channel as? EpollStreamChannel { return own.duplicateDescriptor() }
        guard let channel = self.context?.channel, let local = channel.localAddress,
            let remote = channel.remoteAddress,
            let descriptor = self.socketDescriptor ?? SocketDescriptor.find(local: local, remote: remote)
        else { return nil }
        let copy = fcntl(descriptor, F_DUPFD_CLOEXEC, 0)
        return copy >= 0 ? copy : nil
    }

    /// Server: gives up the current connection of a session whose client resumes it over another (the old
    /// one may look alive here still, when its path went silent): the session detaches, without a word.
    public func releaseConnection() {
        guard let context = self.context, self.core.detach() else { return }
        self.leave(context)
    }

    /// Server: this detached session carries on over `connection`, whose channel this handler was just added
    /// to (docs/PROTOCOL.md §7.3): RESUMED goes out, then the records the client never processed.
    public func takeConnection(_ connection: TunnelSession.Connection, peerCount: UInt64) {
        guard let context = self.context else { return }
        do {
            try self.core.takeConnection(connection, peerCount: peerCount)
        } catch {
            // Given up meanwhile: the client's next attempt learns that the session is gone.
            self.logger.info("cannot resume over \(self.remoteDescription): \(error.detail)")
            self.leave(context)
        }
    }

    /// Closes the channel without a CLOSE or a reset: its socket now belongs to another handler (the
    /// resumed session took it over through a second descriptor).
    public func closeQuietly() {
        self.timer?.cancel()
        self.writer.disable()
        self.context?.close(promise: nil)
    }

    /// Gives up a detached session (no resume came in time, or the process stops): its streams are reset,
    /// and a reconnect in progress is cut. The delegate hears `tunnelClosed`.
    public func abandon(code: ErrorCode, why: String) {
        guard self.core.isDetached else { return }
        self.core.abort(code: code)
        self.flushLocalStreams()
        if let context = self.context {
            self.closeError = .truncated(why)
            context.closeAbortively()
        } else {
            self.delegate?.tunnelClosed(self, error: .truncated(why))
            self.delegate = nil
        }
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
        // What is queued goes out before the CLOSE.
        self.closing = true
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

    func peerClosed(code: ErrorCode, context: ChannelHandlerContext) {
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
        if self.detachIfResumable(error, context: context) { return }
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
}

@available(*, unavailable)
extension TunnelConnectionHandler: Sendable {}
