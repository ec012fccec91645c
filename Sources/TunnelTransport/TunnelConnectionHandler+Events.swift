import Logging
import NIOCore
import TunnelCrypto
import TunnelProtocol

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The connection's side toward the runtime and the stream endpoints: opening streams (client), the full
/// tunnel's packets, CONTROL frames; and what the session and its multiplexer report, passed on to the
/// runtime's delegate and to each stream's endpoint.
extension TunnelConnectionHandler {
    // MARK: - Streams (used by the runtime and the local handlers)

    /// Client: opens a stream to `target` for `local`; the result arrives through `local.openCompleted`.
    /// Returns false when this connection cannot open a stream now.
    ///
    /// `early` (a TCP stream, when the server takes early data): `local` hears success at once (from a task on
    /// this loop, after the caller has returned), bound address unspecified, and what it sends goes with the
    /// OPEN; if the server then fails to connect, the stream is closed as refused (`streamClosed`), so the
    /// application sees a reset.
    public func openStream(
        to target: TargetAddress,
        kind: StreamKind = .tcp,
        local: any StreamEndpoint,
        early: Bool = false
    ) -> Bool {
        guard self.phase == .established, let mux = self.multiplexer, let loop = self.context?.eventLoop,
            let stream = mux.openStream(to: target, kind: kind, early: early)
        else {
            return false
        }
        TunnelStream(stream, tunnel: self).attach(local)
        if stream.awaitingOpenResult {
            // Not from here: the caller is still inside its own handling of the request.
            self.earlyAnswers.append((stream, local))
            if !self.earlyAnswersScheduled {
                self.earlyAnswersScheduled = true
                loop.assumeIsolated().execute { self.answerEarlyOpens() }
            }
        }
        return true
    }

    /// Writes the OPENs queued so far and tells the applications of fast-opened streams "succeeded", now rather
    /// than when this event-loop tick ends: the SOCKS front end calls it once it has read a request, so the
    /// server's connect (and, under fast open, the application's answer and then its first bytes) does not
    /// wait while the loop serves every other socket that was ready in this tick. The OPEN goes first, so the
    /// server's connect starts first.
    public func sendOpensNow() {
        self.flushIfPending()
        self.answerEarlyOpens()
    }

    private func answerEarlyOpens() {
        self.earlyAnswersScheduled = false
        guard !self.earlyAnswers.isEmpty else { return }
        let answers = self.earlyAnswers
        self.earlyAnswers.removeAll(keepingCapacity: true)
        for (stream, local) in answers {
            // Unless the real answer came first (a failure, which then had the exact code).
            guard !stream.state.isClosed, stream.awaitingOpenResult else { continue }
            stream.answeredEarly = true
            local.openCompleted(reply: .succeeded, bound: .unspecified)
        }
    }

    /// Whether the server takes early data on new streams (negotiated).
    public var earlyDataActive: Bool { self.multiplexer?.configuration.earlyData ?? false }

    /// Whether this connection has used up its stream ids (it can only drain).
    public var streamIDsExhausted: Bool { self.multiplexer?.streamIDsExhausted ?? false }

    /// Whether `openStream` would succeed now.
    public var canOpenStream: Bool { self.core.canOpenStream }

    /// A stream's local socket is gone: the stream leaves the table (through `TunnelStream.release`).
    func release(_ stream: MuxStream) {
        guard let mux = self.multiplexer else { return }
        mux.release(stream)
        self.delegate?.tunnelStreamReleased(self)
        self.closeIfDrained()
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
    /// latency path (the full tunnel's packets). Uses `socketDescriptor` when the socket was made by us (the
    /// client's), else finds it by its addresses (a scan of the process's descriptors, once per connection: a
    /// server's accepted sockets come from NIO, which does not tell their descriptors); does nothing if it
    /// cannot. Returns whether it is on.
    @discardableResult
    public func enableDirectWrites() -> Bool {
        guard self.phase == .established, let channel = self.context?.channel else { return self.writer.isEnabled }
        return self.writer.enable(channel: channel, descriptor: self.socketDescriptor)
    }

    /// Whether IP packets flow on this connection (negotiated).
    public var fullTunnelActive: Bool { self.multiplexer?.configuration.fullTunnel ?? false }

    /// Whether IP packets cross this connection with their offload headers (negotiated): the peer's packets
    /// then arrive as device packets, header first.
    public var packetOffloadActive: Bool { self.multiplexer?.configuration.packetOffload ?? false }

    /// IP packets dropped for waiting too long in the send queue (CoDel).
    public var delayedPacketDrops: Int { self.multiplexer?.delayedPacketDrops ?? 0 }

    /// The peer's IP packets refused for their offload header.
    public var refusedPackets: Int { self.multiplexer?.refusedPackets ?? 0 }

    /// Queues one IP packet for the peer; false when it was dropped (queue full, or not a full tunnel).
    @discardableResult
    public func sendIPPacket(_ packet: ByteBuffer) -> Bool {
        guard self.phase == .established, let mux = self.multiplexer else { return false }
        return mux.sendIPPacket(packet)
    }

    /// Queues one IP packet like `sendIPPacket` but without scheduling a flush for it: the caller (a TUN
    /// reader, handing over a read burst) calls `flushNow()` before this event-loop tick ends. One task per
    /// packet less on the latency path.
    /// With `offloadHeader`, the packet starts with the `PacketOffloadHeader` its device read
    /// (`Multiplexer.sendDevicePacket`).
    @discardableResult
    public func enqueueIPPacket(_ packet: ByteBuffer, offloadHeader: Bool = false) -> Bool {
        guard self.phase == .established, let mux = self.multiplexer else { return false }
        self.flushHeld = true
        defer { self.flushHeld = false }
        return offloadHeader ? mux.sendDevicePacket(packet) : mux.sendIPPacket(packet)
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
            delegate.tunnel(self, openRequested: TunnelStream(stream, tunnel: self))
        } else {
            mux.completeOpen(stream, reply: .generalFailure, bound: .unspecified)
        }
    }

    public func multiplexer(_ mux: Multiplexer, openCompleted stream: MuxStream, reply: ReplyCode, bound: TargetAddress)
    {
        self.delegate?.tunnel(self, opened: stream.target, reply: reply, answeredEarly: stream.answeredEarly)
        // An early stream's endpoint heard "succeeded" already: a failure now closes the stream (a reset).
        guard !stream.answeredEarly, let local = stream.context as? any StreamEndpoint else { return }
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
        self.writer.write(message, context: context)
    }

    public func session(_ session: TunnelSession, established: EstablishedSession) {
        let now = NIODeadline.now()
        if self.establishedAt == nil { self.establishedAt = now }
        self.connectedAt = now
        self.delegate?.tunnelEstablished(self, session: established)
    }

    public func sessionConfirmed(_ session: TunnelSession) {
        self.delegate?.tunnelConfirmed(self)
    }

    public func session(_ session: TunnelSession, peerClosed code: ErrorCode) {
        guard let context = self.context else { return }
        self.peerClosed(code: code, context: context)
    }

    public func sessionResumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate? {
        self.delegate?.tunnelResumeCandidate(id: id, key: key)
    }

    public func session(
        _ session: TunnelSession,
        resumeAccepted candidate: ResumeCandidate,
        connection: TunnelSession.Connection,
        peerCount: UInt64
    ) {
        self.delegate?.tunnel(self, resumeAccepted: candidate, connection: connection, peerCount: peerCount)
    }

    public func session(_ session: TunnelSession, resumed replayed: Int) {
        self.connectedAt = .now()
        self.delegate?.tunnelResumed(self, replayed: replayed)
        self.scheduleFlush()
    }

    public func session(_ session: TunnelSession, resumeRefused status: UInt8) {
        // The session reset its streams; this connection is of no further use (the runtime starts afresh).
        self.closeError = .handshakeRejected(
            status == ResumeStatus.unknown
                ? "the server no longer knows this session (restarted, or it expired)"
                : "the server refused to resume this session"
        )
        self.context?.close(promise: nil)
    }
}
