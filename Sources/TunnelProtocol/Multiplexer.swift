import NIOCore
import TunnelCompression

/// What the multiplexer asks of whoever runs its I/O. All calls happen synchronously inside the
/// multiplexer's own methods, on the connection's event loop.
public protocol MultiplexerDelegate: AnyObject {
    /// Server: the peer asks for a stream to `stream.target`. Answer later with `completeOpen`.
    func multiplexer(_ mux: Multiplexer, openRequested stream: MuxStream)
    /// Client: the OPEN_RESULT for `stream` arrived. On failure the stream is already released.
    func multiplexer(_ mux: Multiplexer, openCompleted stream: MuxStream, reply: ReplyCode, bound: TargetAddress)
    /// Stream bytes to write to the local socket. Report them with `consumed` once written.
    func multiplexer(_ mux: Multiplexer, received data: ByteBuffer, on stream: MuxStream)
    /// The peer sent FIN: shut the local socket's output once everything before it is written.
    func multiplexer(_ mux: Multiplexer, receivedEndOfStream stream: MuxStream)
    /// The stream is over. With `reset` set, close the local socket abortively now; otherwise close it once
    /// its writes are out. Either way, call `release` when the local socket is gone.
    func multiplexer(_ mux: Multiplexer, streamClosed stream: MuxStream, reset: ErrorCode?)
    /// The local socket of `stream` may read again (credit or buffer space came back).
    func multiplexer(_ mux: Multiplexer, streamWantsRead stream: MuxStream)
    /// The peer sent GOAWAY: it accepts no stream above `lastStreamID`.
    func multiplexer(_ mux: Multiplexer, peerGoingAway lastStreamID: StreamID, code: ErrorCode)
    /// Frames are waiting to be sent: produce records soon (once per event-loop tick).
    func multiplexerHasOutput(_ mux: Multiplexer)
    /// Full tunnel: one IP packet from the peer (a slice of the record: use it before returning).
    func multiplexer(_ mux: Multiplexer, receivedIPPacket packet: ByteBuffer)
    /// A CONTROL frame's TLVs from the peer.
    func multiplexer(_ mux: Multiplexer, receivedControl payload: ByteBuffer) throws(ProtocolError)
}

extension MultiplexerDelegate {
    public func multiplexer(_ mux: Multiplexer, receivedIPPacket packet: ByteBuffer) {}
    public func multiplexer(_ mux: Multiplexer, receivedControl payload: ByteBuffer) throws(ProtocolError) {}
}

/// The stream multiplexer of one tunnel connection (docs/PROTOCOL.md §3): stream table, per-stream and connection
/// flow control, and the sender's scheduler (control frames first, then deficit round-robin over streams that
/// have both data and credit). It does no I/O: the handler feeds it decrypted records and local events, and
/// pulls record plaintexts from it.
///
/// Everything per event is O(1) in the number of streams: streams sit in queues only while they have work.
public final class Multiplexer {
    /// Which end of the tunnel this is; decides stream id parity and who may open streams.
    public enum Role: Sendable { case client, server }

    /// Limits and sizes.
    public struct Configuration: Sendable {
        /// Receive window each new stream starts with.
        public var initialStreamWindow: Int = 1 << 20
        /// Receive window a UDP association starts with when datagrams spend credit (`datagramCredit`): small,
        /// so a flood that the far end hands on slower than it arrives queues at most this much ahead of other
        /// streams' frames; auto-tuned from the path's minimum RTT (as stream windows are) up to
        /// `maxStreamWindow`, so a fast UDP transfer over a long path is not held to it.
        public var initialDatagramWindow: Int = 128 << 10
        /// Largest a stream's receive window may auto-tune to.
        public var maxStreamWindow: Int = 4 << 20
        /// Connection-level receive window: bounds the data in flight towards this end. Its credit returns as
        /// soon as bytes reach their stream's buffer (each stream's own window bounds what a reader that stops
        /// reading holds), so stalled streams never hold back the others; past `maxBufferedBytes` it returns
        /// only as bytes are consumed, which bounds the memory of all buffers together.
        public var connectionWindow: Int = 16 << 20
        /// Received bytes that may wait in stream buffers (for local sockets that do not read) before the
        /// connection window stops returning credit on arrival.
        public var maxBufferedBytes: Int = 256 << 20
        /// Most concurrent streams the peer may open here.
        public var maxConcurrentStreams: Int = 16384
        /// Deficit round-robin quantum: bytes a stream may send per turn.
        public var quantum: Int = 16 << 10
        /// Bytes a new or quiet stream may send ahead of bulk streams, and how fast that allowance comes
        /// back (`StreamScheduler`): a stream that sends less than this per second stays interactive.
        public var interactiveBurst: Int = 128 << 10
        public var interactiveRefillPerSecond: Int = 128 << 10
        /// While interactive streams keep the sender busy, bulk streams get a turn after this many of their
        /// bytes (about a 1/17 share at the default quantum).
        public var bulkTurnAfter: Int = 256 << 10
        /// A stream stops reading its local socket once this many bytes wait to be sent.
        public var streamPendingLimit: Int = 256 << 10
        /// All streams together stop reading once this many bytes wait to be sent.
        public var totalPendingLimit: Int = 4 << 20
        /// Most bytes of control frames that may wait (a peer that never reads PING answers hits this).
        public var maxQueuedControlBytes: Int = 1 << 20
        /// Whether stream data may be compressed (negotiated in the handshake; both sides must agree).
        public var compression = false
        /// Most plaintext in one compressed frame; the receiver refuses frames that inflate to more.
        public var compressedFrameLimit = 60 << 10
        /// A sending context unused this long is freed (the next frame starts a new one).
        public var compressorIdleTimeout: TimeAmount = .seconds(30)
        /// A receiving context unused this long is freed (longer than the sender's, so it is never needed again).
        public var decompressorIdleTimeout: TimeAmount = .seconds(60)
        /// Datagrams waiting to be sent are dropped beyond this many bytes (UDP has no flow control: a
        /// bounded queue that drops is its congestion signal).
        public var maxQueuedDatagramBytes: Int = 1 << 20
        /// Datagram sockets are read only while fewer bytes than this wait in the datagram queue: a flood
        /// beyond what the tunnel takes stays in the socket's buffer, where the kernel drops it (and counts it)
        /// at no cost to this process, instead of being read, queued and dropped here.
        public var datagramReadLimit: Int = 256 << 10
        /// Whether datagrams spend their stream's window (negotiated in the handshake): the sender drops a
        /// datagram that finds no credit, the receiver returns credit once it handed the datagram on.
        public var datagramCredit = false
        /// Whether IP packets flow (full-tunnel mode; negotiated in the handshake).
        public var fullTunnel = false
        /// Whether TCP streams may carry data before their OPEN_RESULT (negotiated; `SessionFeatures.earlyData`).
        public var earlyData = false
        /// Whether records are numbered and acknowledged with RECEIVED (negotiated; `SessionFeatures.resumption`).
        public var resumption = false
        /// Whether IP packets carry a `PacketOffloadHeader` (negotiated): then `sendIPPacket` takes, and the
        /// delegate gets, device packets (header + IP packet).
        public var packetOffload = false
        /// IP packets waiting to be sent are dropped beyond this many, or beyond `maxQueuedPacketBytes`: drops
        /// are the congestion signal the tunnelled TCP flows need (docs/PROTOCOL.md §5). The queue is fair
        /// between flows (`PacketFairQueue`), so a sparse flow does not wait behind it, and each flow's CoDel
        /// drops before its packets wait long, so these limits are reached only by bursts.
        public var maxQueuedPackets: Int = 384
        public var maxQueuedPacketBytes: Int = 4 << 20
        public init() {}
    }

    public let role: Role
    public let configuration: Configuration
    public weak var delegate: (any MultiplexerDelegate)?

    // MARK: - Stream table
    var streams: [UInt32: MuxStream] = [:]
    private var nextLocalStreamID: UInt32
    /// Highest stream id the peer has opened.
    public internal(set) var lastPeerStreamID = StreamID(0)
    /// The peer's announced limit on streams we open.
    public private(set) var peerMaxConcurrentStreams: Int
    /// Number of streams we opened that are still known.
    public private(set) var localStreamCount = 0
    /// Number of streams the peer opened that are still known.
    public internal(set) var peerStreamCount = 0

    // MARK: - Flow control
    var connectionSendCredit: SendCredit
    var connectionReceiveWindow: ReceiveWindow
    /// Bytes received for streams and not yet consumed (written to their local sockets), all streams together.
    public internal(set) var bufferedReceiveBytes = 0

    // MARK: - Scheduler
    var controlQueue = CircularBuffer<ControlFrame>(initialCapacity: 16)
    var controlQueueBytes = 0
    /// Streams with data and credit, in the order they send.
    var activeStreams: StreamScheduler
    /// The latest time the multiplexer was told (records and consumption carry it): local reads, which do
    /// not, are scheduled at it.
    var clock = NIODeadline.uptimeNanoseconds(0)
    var streamsAwaitingConnectionCredit = CircularBuffer<MuxStream>(initialCapacity: 4)
    var readBlockedStreams = CircularBuffer<MuxStream>(initialCapacity: 4)
    /// UDP associations whose socket waits for room in the datagram queue (`shouldReadDatagrams`).
    var datagramReadersWaiting = CircularBuffer<MuxStream>(initialCapacity: 4)
    var datagramQueue = CircularBuffer<(StreamID, ByteBuffer)>(initialCapacity: 16)
    var datagramQueueBytes = 0
    /// Datagrams dropped because the queue was full (sending side).
    public internal(set) var droppedDatagrams = 0

    // MARK: - Counters (status and metrics; plain integers, bumped once per frame)
    /// Stream bytes sent and received (as the applications see them: before compression, after inflation).
    public internal(set) var payloadBytesSent = 0
    public internal(set) var payloadBytesReceived = 0
    /// Streams opened by either side so far.
    public internal(set) var streamsOpened = 0
    /// Datagrams queued for sending, and received for an open association.
    public internal(set) var datagramsSent = 0
    public internal(set) var datagramsReceived = 0
    /// IP packets waiting (full tunnel), one queue per flow.
    var packetQueue: PacketFairQueue
    /// IP packets waiting to be sent.
    public var queuedPackets: Int { self.packetQueue.count }
    /// IP packets dropped because the queue was full (sending side).
    public internal(set) var droppedPackets = 0
    /// IP packets from the peer whose offload header this end refused (`PacketOffloadHeader.isAcceptable`).
    public internal(set) var refusedPackets = 0
    /// IP packets the queue dropped for waiting too long (CoDel, `PacketFairQueue`).
    public var delayedPacketDrops: Int { self.packetQueue.delayDrops }

    // MARK: - Compression
    /// Streams holding a deflate or inflate context, swept for idle ones (only these, never all streams).
    var compressingStreams: [UInt32: MuxStream] = [:]
    /// Plaintext bytes sent compressed, and what they became on the wire.
    public internal(set) var compressedInput = 0
    public internal(set) var compressedOutput = 0
    var totalPendingBytes = 0
    /// The part of `totalPendingBytes` held by streams whose send credit is spent (`MuxStream.creditStalled`).
    var stalledPendingBytes = 0
    /// Pending bytes that wait for the tunnel (and not for a peer's reader): what the pending limit bounds.
    var sendablePendingBytes: Int { self.totalPendingBytes - self.stalledPendingBytes }
    var tunnelWritable = true

    // MARK: - Connection state
    /// We sent GOAWAY: no new peer streams are accepted.
    public private(set) var localGoingAway = false
    /// The peer sent GOAWAY: we open no new streams.
    public internal(set) var peerGoingAway = false
    /// Smoothed round-trip time from PING answers.
    public private(set) var smoothedRoundTrip: TimeAmount? = nil
    /// RTT samples taken so far, and the latest (metrics read them after each socket read).
    public private(set) var roundTripSamples = 0
    public private(set) var lastRoundTrip = TimeAmount.zero
    /// The smallest RTT seen lately: the path's own delay, without the queueing a busy tunnel adds. Window
    /// auto-tuning uses it, so windows grow for long paths but not to fill queues (which would delay every
    /// interactive frame behind bulk data).
    public private(set) var minimumRoundTrip: TimeAmount? = nil
    private var minimumRoundTripExpires = NIODeadline.distantPast
    private var outstandingPing: UInt64? = nil
    private var lastPingSent = NIODeadline.distantPast

    /// - Parameters:
    ///   - peerParameters: what the peer announced in the handshake (its limits and connection window).
    public init(
        role: Role,
        configuration: Configuration = Configuration(),
        peerParameters: SessionParameters,
        firstStreamID: UInt32? = nil
    ) {
        self.role = role
        self.configuration = configuration
        self.nextLocalStreamID = firstStreamID ?? (role == .client ? 1 : 2)
        self.peerMaxConcurrentStreams = Int(peerParameters.maxConcurrentStreams)
        self.connectionSendCredit = SendCredit(Int(peerParameters.connectionWindow))
        self.connectionReceiveWindow = ReceiveWindow(target: configuration.connectionWindow)
        // One bucket outside full-tunnel mode, where no packet is ever queued.
        self.packetQueue = PacketFairQueue(
            flowCount: configuration.fullTunnel ? 1024 : 1,
            limitPackets: configuration.maxQueuedPackets,
            limitBytes: configuration.maxQueuedPacketBytes,
            headerBytes: configuration.packetOffload ? PacketOffloadHeader.byteCount : 0
        )
        self.activeStreams = StreamScheduler(
            policy: .init(
                burst: configuration.interactiveBurst,
                refillPerSecond: configuration.interactiveRefillPerSecond,
                bulkTurnAfter: configuration.bulkTurnAfter
            )
        )
    }

    /// Moves the multiplexer's clock forward to `now`.
    func advanceClock(to now: NIODeadline) {
        if now > self.clock { self.clock = now }
    }

    /// The parameters this side announces in its handshake, matching `configuration`.
    public static func announcedParameters(
        for configuration: Configuration,
        features: SessionFeatures = []
    ) -> SessionParameters {
        var parameters = SessionParameters()
        parameters.features = features
        parameters.maxConcurrentStreams = UInt32(configuration.maxConcurrentStreams)
        parameters.connectionWindow = UInt32(configuration.connectionWindow)
        return parameters
    }

    /// Number of streams in the table.
    public var streamCount: Int { self.streams.count }

    /// Looks a stream up by id.
    public func stream(_ id: StreamID) -> MuxStream? { self.streams[id.rawValue] }

    var nextLocalStreamIDValue: UInt32 { self.nextLocalStreamID }

    /// Bytes of control frames and stream data waiting to be sent (an estimate of the next records' size).
    public var queuedOutputBytes: Int {
        self.controlQueueBytes + self.sendablePendingBytes + self.datagramQueueBytes + self.queuedPacketBytes
    }

    /// Bytes of IP packets waiting.
    var queuedPacketBytes: Int { self.packetQueue.bytes }

    /// Whether frames are waiting to be sent.
    public var hasOutput: Bool {
        !self.controlQueue.isEmpty || !self.activeStreams.isEmpty || !self.datagramQueue.isEmpty
            || self.queuedPacketBytes > 0
    }

    // MARK: - Opening streams

    /// Whether every stream id of this side is used (2^31 of them): only a new connection can open more.
    public var streamIDsExhausted: Bool { self.nextLocalStreamID > UInt32(Int32.max) - 2 }

    /// Whether `openStream` would succeed now.
    public var canOpenStream: Bool {
        !self.peerGoingAway && self.localStreamCount < self.peerMaxConcurrentStreams && !self.streamIDsExhausted
    }

    /// Opens a stream to `target` (OPEN goes out with the next record). `nil` if the peer's limit is reached,
    /// the peer is going away, or stream ids are used up.
    ///
    /// `early` (a TCP stream, with early data negotiated): the stream is open at once, with
    /// `WireLimits.earlyDataWindow` bytes of credit until the OPEN_RESULT says more; its bytes follow the OPEN
    /// in the same record. A failed result then closes it like a RESET (`streamClosed`, code `refusedStream`)
    /// and `openCompleted` reports the reply; a successful one only adjusts the credit.
    public func openStream(to target: TargetAddress, kind: StreamKind = .tcp, early: Bool = false) -> MuxStream? {
        guard self.canOpenStream else { return nil }
        let id = StreamID(self.nextLocalStreamID)
        self.nextLocalStreamID += 2
        let stream = self.makeStream(id, target: target, kind: kind)
        if early && kind == .tcp && self.configuration.earlyData {
            stream.state = .open
            stream.awaitingOpenResult = true
            stream.sendCredit = SendCredit(WireLimits.earlyDataWindow)
        }
        self.streams[id.rawValue] = stream
        self.localStreamCount += 1
        self.enqueueControl(
            .open(id, kind: kind, window: UInt32(self.initialWindow(for: kind)), target: target)
        )
        return stream
    }

    /// The receive window this side grants a new stream of `kind`.
    func initialWindow(for kind: StreamKind) -> Int {
        if kind == .udp && self.configuration.datagramCredit { return self.configuration.initialDatagramWindow }
        // An opener with early data may have sent this much before it learns the window.
        return self.configuration.earlyData
            ? max(self.configuration.initialStreamWindow, WireLimits.earlyDataWindow)
            : self.configuration.initialStreamWindow
    }

    /// A new stream with this side's initial receive window.
    func makeStream(_ id: StreamID, target: TargetAddress, kind: StreamKind) -> MuxStream {
        let stream = MuxStream(
            id: id,
            target: target,
            kind: kind,
            receiveWindow: ReceiveWindow(
                target: self.initialWindow(for: kind),
                maxTarget: self.configuration.maxStreamWindow
            )
        )
        self.activeStreams.admit(stream, now: self.clock)
        stream.openedAt = self.clock
        self.streamsOpened += 1
        return stream
    }

    /// Queues one datagram (`atyp addr port data`) on a UDP association. Returns false when it was dropped
    /// (and counted in `droppedDatagrams` unless the association is not open): the datagram does not fit one
    /// record (`WireLimits.maxUnsplitFramePayload`), or the queue is full.
    @discardableResult
    public func sendDatagram(_ payload: ByteBuffer, on stream: MuxStream) -> Bool {
        guard stream.kind == .udp, stream.state.isOpen else { return false }
        guard payload.readableBytes <= WireLimits.maxUnsplitFramePayload,
            self.datagramQueueBytes + payload.readableBytes <= self.configuration.maxQueuedDatagramBytes,
            !self.configuration.datagramCredit || stream.sendCredit.available >= payload.readableBytes
        else {
            self.droppedDatagrams += 1
            return false
        }
        if self.configuration.datagramCredit { stream.sendCredit.spend(payload.readableBytes) }
        self.datagramsSent += 1
        self.datagramQueue.append((stream.id, payload))
        self.datagramQueueBytes += payload.readableBytes
        self.delegate?.multiplexerHasOutput(self)
        return true
    }

    /// Whether the datagram socket of the UDP association `stream` should read now: while the datagram queue
    /// holds less than `datagramReadLimit` and (with datagram credit) the stream has credit for a datagram of
    /// any size. When not, the stream is remembered and `streamWantsRead` fires once the queue has drained to
    /// half of the limit, or credit came back.
    public func shouldReadDatagrams(for stream: MuxStream) -> Bool {
        if self.datagramCreditShort(stream) {
            // The WINDOW_UPDATE that brings credit wakes it.
            stream.readBlocked = true
            return false
        }
        guard self.datagramQueueBytes >= self.configuration.datagramReadLimit else { return true }
        if !stream.readBlocked && stream.state.isOpen {
            stream.readBlocked = true
            self.datagramReadersWaiting.append(stream)
        }
        return false
    }

    /// With datagram credit, whether `stream` lacks the credit for a datagram of any size.
    func datagramCreditShort(_ stream: MuxStream) -> Bool {
        self.configuration.datagramCredit && stream.sendCredit.available < WireLimits.maxUnsplitFramePayload
    }

    /// Full tunnel: queues one IP packet in the flow-fair packet queue (`PacketFairQueue`); with
    /// `packetOffload`, a device packet (its `PacketOffloadHeader` first). Returns false when
    /// it was dropped: full-tunnel mode was not negotiated, or (counted in `droppedPackets`) the packet does not
    /// fit one record. A full queue drops the oldest packet of the flow holding most bytes (counted too), which
    /// may be this one. Packets share the datagrams' part of each record against streams.
    @discardableResult
    public func sendIPPacket(_ packet: ByteBuffer, now: NIODeadline = .now()) -> Bool {
        guard self.configuration.fullTunnel, packet.readableBytes > 0 else { return false }
        guard packet.readableBytes <= WireLimits.maxUnsplitFramePayload else {
            self.droppedPackets += 1
            return false
        }
        self.droppedPackets += self.packetQueue.enqueue(packet, now: now.uptimeNanoseconds)
        self.delegate?.multiplexerHasOutput(self)
        return true
    }

    /// Full tunnel: queues a packet as a device with offload headers read it (`PacketOffloadHeader` + IP
    /// packet). With `packetOffload` it goes as it is; without, only a plain packet can go (its header
    /// stripped); one to segment or to checksum is dropped and counted (the device had offload on while it
    /// served a peer without it).
    @discardableResult
    public func sendDevicePacket(_ packet: ByteBuffer, now: NIODeadline = .now()) -> Bool {
        guard self.configuration.fullTunnel else { return false }
        if self.configuration.packetOffload {
            guard packet.readableBytes > PacketOffloadHeader.byteCount else { return false }
            return self.sendIPPacket(packet, now: now)
        }
        guard let header = PacketOffloadHeader(from: packet), header.isPlain else {
            self.droppedPackets += 1
            return false
        }
        return self.sendIPPacket(packet.skippingOffloadHeader(), now: now)
    }

    /// Sends a CONTROL frame (TLVs) ahead of stream data.
    public func sendControl(_ payload: ByteBuffer) {
        precondition(payload.readableBytes <= WireLimits.maxUnsplitFramePayload)
        self.enqueueControl(.control(payload))
    }

    /// Server: answers a requested stream. On failure the stream is released at once.
    public func completeOpen(_ stream: MuxStream, reply: ReplyCode, bound: TargetAddress) {
        guard !stream.released, stream.state == .opening else { return }
        self.enqueueControl(
            .openResult(stream.id, reply: reply, window: UInt32(self.initialWindow(for: stream.kind)), bound: bound)
        )
        if reply == .succeeded {
            // Early data may have brought bytes and the opener's FIN already: they go to the local socket now.
            stream.state = stream.earlyFinReceived ? .halfClosedRemote : .open
            let early = stream.earlyReceived
            stream.earlyReceived = []
            for data in early where !stream.released { self.delegate?.multiplexer(self, received: data, on: stream) }
            if stream.earlyFinReceived && !stream.released {
                self.delegate?.multiplexer(self, receivedEndOfStream: stream)
            }
        } else {
            stream.state = .closed(reset: nil)
            self.release(stream)
        }
    }

    // MARK: - Local events

    /// Bytes read from the local socket of `stream`.
    public func localRead(_ data: ByteBuffer, on stream: MuxStream) {
        guard stream.state.isOpen, !stream.localEndOfStream, data.readableBytes > 0 else { return }
        stream.pending.append(data)
        stream.pendingBytes += data.readableBytes
        self.totalPendingBytes += data.readableBytes
        if stream.creditStalled {
            self.stalledPendingBytes += data.readableBytes
        } else if stream.sendCredit.available == 0 {
            self.markCreditStalled(stream)
        }
        self.schedule(stream)
    }

    /// The local socket of `stream` reached EOF: FIN follows the pending bytes.
    public func localEndOfStream(on stream: MuxStream) {
        guard stream.state.isOpen, !stream.localEndOfStream else { return }
        stream.localEndOfStream = true
        self.schedule(stream)
    }

    /// `count` received bytes of `stream` were written to its local socket: credit may go back to the peer.
    public func consumed(_ count: Int, on stream: MuxStream, now: NIODeadline) {
        guard !stream.released, count > 0 else { return }
        self.advanceClock(to: now)
        let taken = min(count, stream.receiveWindow.buffered)
        self.bufferedReceiveBytes -= taken
        let owed = min(taken, stream.connectionCreditOwed)
        stream.connectionCreditOwed -= owed
        if owed > 0 { self.consumeConnection(owed, now: now) }
        if !stream.state.isClosed,
            let increment = stream.receiveWindow.consumed(count, now: now, roundTrip: self.minimumRoundTrip)
        {
            self.enqueueControl(.windowUpdate(stream.id, increment: increment))
            // Keep RTT samples coming while data flows (at most one PING in flight, ten per second).
            if self.outstandingPing == nil && now - self.lastPingSent >= .milliseconds(100) {
                self.sendPing(now: now)
            }
        } else if stream.state.isClosed {
            _ = stream.receiveWindow.consumed(count, now: now, roundTrip: nil)
        }
    }

    /// The local socket of `stream` failed or was reset: RESET the stream.
    public func resetStream(_ stream: MuxStream, code: ErrorCode) {
        guard !stream.released, !stream.state.isClosed else { return }
        self.enqueueControl(.reset(stream.id, code))
        self.markClosed(stream, reset: code)
    }

    /// The local socket of `stream` is gone. Its unconsumed bytes return to the connection window and the
    /// stream leaves the table. A stream whose both directions had ended locally (EOF read, FIN received)
    /// still sends its FIN first; any other stream that is not yet closed is reset.
    public func release(_ stream: MuxStream) {
        guard !stream.released, !stream.releaseWhenFinished else { return }
        stream.context = nil
        if stream.state.isOpen && stream.localEndOfStream && stream.finReceived {
            if stream.finSent {
                self.markClosed(stream, reset: nil)
            } else {
                stream.releaseWhenFinished = true
                return
            }
        }
        if !stream.state.isClosed {
            self.enqueueControl(.reset(stream.id, .cancel))
            self.markClosed(stream, reset: .cancel)
        }
        self.removeFromTable(stream)
    }

    func removeFromTable(_ stream: MuxStream) {
        guard !stream.released else { return }
        stream.released = true
        stream.context = nil
        stream.compression = .off
        stream.inflater = nil
        stream.earlyReceived = []
        self.compressingStreams.removeValue(forKey: stream.id.rawValue)
        self.streams.removeValue(forKey: stream.id.rawValue)
        if stream.id.isClientInitiated == (self.role == .client) {
            self.localStreamCount -= 1
        } else {
            self.peerStreamCount -= 1
        }
        self.bufferedReceiveBytes -= stream.receiveWindow.releaseAll()
        let owed = stream.connectionCreditOwed
        stream.connectionCreditOwed = 0
        if owed > 0 { self.consumeConnection(owed, now: .now()) }
    }

    /// Whether the local socket of `stream` should read now. When only a connection-wide limit is in the way,
    /// the stream is remembered and `streamWantsRead` fires once the limit clears.
    public func shouldRead(_ stream: MuxStream) -> Bool {
        guard stream.state.isOpen, !stream.localEndOfStream,
            stream.pendingBytes < self.configuration.streamPendingLimit,
            stream.sendCredit.available > stream.pendingBytes
        else { return false }
        if self.readGateOpen { return true }
        if !stream.readBlocked {
            stream.readBlocked = true
            self.readBlockedStreams.append(stream)
        }
        return false
    }

    /// The tunnel connection's writability changed (its outbound buffer crossed a watermark).
    public func tunnelWritabilityChanged(_ writable: Bool) {
        self.tunnelWritable = writable
        if writable { self.resumeBlockedReaders() }
    }

    // MARK: - Connection control

    /// Queues a PING carrying `now` (answered with ACK; gives the RTT).
    public func sendPing(now: NIODeadline) {
        let opaque = now.uptimeNanoseconds
        self.outstandingPing = opaque
        self.lastPingSent = now
        self.enqueueControl(.ping(opaque, ack: false))
    }

    /// Queues GOAWAY: the peer may open no more streams; open ones continue.
    public func goAway(code: ErrorCode) {
        guard !self.localGoingAway else { return }
        self.localGoingAway = true
        self.enqueueControl(.goAway(lastStreamID: self.lastPeerStreamID, code))
    }

    /// Every stream still known, for shutdown and truncation handling.
    public var allStreams: [MuxStream] { Array(self.streams.values) }

    /// The tunnel is gone: every stream is closed with `code` (abortively) and released by its handler. A
    /// stream this side opened that still waits for its OPEN_RESULT gets a failed result first (and is
    /// released), as on RESET and GOAWAY: its application must get an answer.
    public func abortAllStreams(code: ErrorCode) {
        for stream in Array(self.streams.values) where !stream.state.isClosed {
            if stream.state == .opening && stream.id.isClientInitiated == (self.role == .client) {
                stream.state = .closed(reset: code)
                self.delegate?.multiplexer(self, openCompleted: stream, reply: .generalFailure, bound: .unspecified)
                self.release(stream)
            } else {
                self.markClosed(stream, reset: code)
            }
        }
    }

    /// Frees compression contexts that idled (call every few seconds). Touches only streams that hold one.
    public func releaseIdleCompressionContexts(now: NIODeadline) {
        for stream in self.compressingStreams.values {
            if case .active(_, _, let lastUse) = stream.compression,
                now - lastUse >= self.configuration.compressorIdleTimeout
            {
                stream.compression = .idle
            }
            if stream.inflater != nil && now - stream.lastInflate >= self.configuration.decompressorIdleTimeout {
                stream.inflater = nil
            }
            if case .active = stream.compression {
            } else if stream.inflater == nil {
                self.compressingStreams.removeValue(forKey: stream.id.rawValue)
            }
        }
    }

    /// How many streams hold a compression context now.
    public var streamsWithCompressionContexts: Int { self.compressingStreams.count }

    // MARK: - Internals shared by receiving and sending

    var readGateOpen: Bool {
        self.tunnelWritable && self.sendablePendingBytes < self.configuration.totalPendingLimit
            && self.connectionSendCredit.available > 0
    }

    /// Every new piece of output tells the delegate, which coalesces these into one flush per tick: a rule of
    /// "only when the queues were empty" would leave output that no flush ever comes for, should anything stay
    /// queued after a flush.
    func enqueueControl(_ frame: ControlFrame) {
        self.controlQueue.append(frame)
        self.controlQueueBytes += frame.encodedLength
        self.delegate?.multiplexerHasOutput(self)
    }

    func schedule(_ stream: MuxStream) {
        guard !stream.scheduled, stream.hasSendableWork else { return }
        stream.scheduled = true
        if stream.pendingBytes > 0 && self.connectionSendCredit.available == 0 {
            self.streamsAwaitingConnectionCredit.append(stream)
        } else {
            self.activeStreams.append(stream, now: self.clock)
            self.delegate?.multiplexerHasOutput(self)
        }
    }

    func consumeConnection(_ count: Int, now: NIODeadline) {
        if let increment = self.connectionReceiveWindow.consumed(count, now: now, roundTrip: nil) {
            self.enqueueControl(.windowUpdate(.connection, increment: increment))
        }
    }

    /// Moves a stream to `closed` and tells the delegate (once).
    func markClosed(_ stream: MuxStream, reset: ErrorCode?) {
        guard !stream.state.isClosed else { return }
        stream.state = .closed(reset: reset)
        stream.awaitingOpenResult = false
        self.clearCreditStalled(stream)
        self.totalPendingBytes -= stream.pendingBytes
        stream.pendingBytes = 0
        stream.pending.removeAll()
        if stream.releaseWhenFinished {
            self.removeFromTable(stream)
        } else {
            self.delegate?.multiplexer(self, streamClosed: stream, reset: reset)
        }
    }

    /// The stream's send credit is spent while bytes wait: they no longer count against the pending limit.
    func markCreditStalled(_ stream: MuxStream) {
        guard !stream.creditStalled, stream.pendingBytes > 0 else { return }
        stream.creditStalled = true
        self.stalledPendingBytes += stream.pendingBytes
    }

    /// Credit came back (or the stream ended): its waiting bytes count against the pending limit again.
    func clearCreditStalled(_ stream: MuxStream) {
        guard stream.creditStalled else { return }
        stream.creditStalled = false
        self.stalledPendingBytes -= stream.pendingBytes
    }

    func resumeBlockedReaders() {
        while self.readGateOpen, let stream = self.readBlockedStreams.popFirst() {
            stream.readBlocked = false
            if !stream.released && stream.state.isOpen {
                self.delegate?.multiplexer(self, streamWantsRead: stream)
            }
        }
    }

    func notePong(_ opaque: UInt64, now: NIODeadline) {
        guard opaque == self.outstandingPing else { return }
        self.outstandingPing = nil
        let sample = TimeAmount.nanoseconds(Int64(bitPattern: now.uptimeNanoseconds &- opaque))
        guard sample >= .zero else { return }
        self.roundTripSamples += 1
        self.lastRoundTrip = sample
        if let current = self.smoothedRoundTrip {
            self.smoothedRoundTrip = .nanoseconds((current.nanoseconds * 7 + sample.nanoseconds) / 8)
        } else {
            self.smoothedRoundTrip = sample
        }
        // A minimum that expires after 10 s follows a path that got longer (a route change).
        if let minimum = self.minimumRoundTrip, sample >= minimum, now < self.minimumRoundTripExpires { return }
        self.minimumRoundTrip = sample
        self.minimumRoundTripExpires = now + .seconds(10)
    }
}
