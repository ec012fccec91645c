import NIOCore
import TunnelCrypto

/// What a session asks of, and tells, whoever drives it. Calls come in protocol order, synchronously, from
/// inside `receive`, `start` and `tick`; nothing here touches a socket.
public protocol TunnelSessionDelegate: AnyObject {
    /// Server: whether a client key may connect (asked before the handshake finishes).
    func sessionAuthorize(_ key: PublicKey) -> Bool
    /// Server: the replay check of a handshake's timestamp (records it when accepted).
    func sessionCheckReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict
    /// A handshake message to write, framed.
    func session(_ session: TunnelSession, send message: ByteBuffer)
    /// The handshake finished: the multiplexer exists. Records that follow are processed after this returns.
    func session(_ session: TunnelSession, established: EstablishedSession)
    /// Server: the client proved it holds the session keys (its first record authenticated).
    func sessionConfirmed(_ session: TunnelSession)
    /// The peer ended the tunnel with an authenticated CLOSE.
    func session(_ session: TunnelSession, peerClosed code: ErrorCode)
    /// Server: the session named `id` that the client holding `key` may resume (§7.3), if any.
    func sessionResumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate?
    /// Server: this new connection's client proved it may resume `candidate`. This session is spent; the
    /// runtime hands `connection` to the resumed session (`takeConnection`), on that session's event loop.
    func session(
        _ session: TunnelSession,
        resumeAccepted candidate: ResumeCandidate,
        connection: TunnelSession.Connection,
        peerCount: UInt64
    )
    /// The session goes on over a new connection (§7.3); `replayed` of its records went out again.
    func session(_ session: TunnelSession, resumed replayed: Int)
    /// Client: the server would not resume (`status` 1: it does not know the session, 2: refused). The
    /// session's streams were reset; the connection is of no further use.
    func session(_ session: TunnelSession, resumeRefused status: UInt8)
}

extension TunnelSessionDelegate {
    public func sessionResumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate? { nil }
    public func session(
        _ session: TunnelSession,
        resumeAccepted candidate: ResumeCandidate,
        connection: TunnelSession.Connection,
        peerCount: UInt64
    ) {}
    public func session(_ session: TunnelSession, resumed replayed: Int) {}
    public func session(_ session: TunnelSession, resumeRefused status: UInt8) {}
}

/// What a server keeps of a resumable session to check a RESUME against, from any thread (§7.3).
public struct ResumeCandidate: Sendable {
    public let sessionID: [UInt8]
    public let clientKey: PublicKey
    public let secret: SecretBytes
    public init(sessionID: [UInt8], clientKey: PublicKey, secret: SecretBytes) {
        self.sessionID = sessionID
        self.clientKey = clientKey
        self.secret = secret
    }
}

/// The answer in a RESUMED frame (docs/PROTOCOL.md §7.3).
public enum ResumeStatus {
    public static let resumed: UInt8 = 0
    public static let unknown: UInt8 = 1
    public static let refused: UInt8 = 2
}

/// One tunnel session as a value with no channel, socket or clock of its own: the handshake (either role),
/// feature agreement, the record layer with its rekeys, the multiplexer, and the connection timers
/// (docs/PROTOCOL.md §1-§3). Bytes from the connection go in through `receive`; records to write come out of
/// `produceRecords`; `tick` runs the timers on the time it is given. A connection handler around it only
/// moves bytes and acts on what it is told, and a test can pump two sessions back to back in memory.
public final class TunnelSession {
    public enum Role {
        case client(ClientHandshakeStateMachine)
        case server(ServerHandshakeStateMachine)
    }

    public struct Configuration: Sendable {
        public var multiplexer = Multiplexer.Configuration()
        public var rekeyPolicy = RekeyPolicy()
        public var timers = ConnectionTimers.Configuration()
        /// Largest handshake message accepted (message 1 is about 130 bytes).
        public var maxHandshakeMessage = 4096
        /// Client: ask for compression. Server: allow it when asked.
        public var compression = false
        /// Client: ask for full-tunnel mode. Server: allow it.
        public var fullTunnel = false
        /// Offer (client) or allow (server) credit for datagrams; on unless a test turns it off.
        public var datagramCredit = true
        /// Offer (client) or allow (server) offload headers on IP packets: set when this end's device has
        /// them (`PacketOffloadHeader`), and only with `fullTunnel`.
        public var packetOffload = false
        /// Offer (client) or allow (server) early data on new streams (`SessionFeatures.earlyData`).
        public var earlyData = false
        /// Offer (client) or allow (server) numbered, acknowledged records (`SessionFeatures.resumption`).
        public var resumption = false
        /// Most plaintext bytes kept for the peer to acknowledge before no more records are produced.
        public var maxRetainedBytes = 32 << 20
        /// Received records after which an acknowledgement goes out even when there is nothing else to send.
        public var acknowledgeEvery: UInt64 = 32
        public init() {}

        /// What a client offers in its handshake (or a server would grant).
        public var features: SessionFeatures {
            var features: SessionFeatures = []
            if self.compression { features.insert(.compression) }
            if self.fullTunnel { features.insert(.fullTunnel) }
            if self.datagramCredit { features.insert(.datagramCredit) }
            if self.fullTunnel && self.packetOffload { features.insert(.packetOffload) }
            if self.earlyData { features.insert(.earlyData) }
            if self.resumption { features.insert(.resumption) }
            return features
        }
    }

    public enum Phase: Sendable {
        /// Handshake messages are being exchanged; no records yet.
        case handshaking
        /// Records flow.
        case established
        /// CLOSE sent or received, or the session failed; nothing more is processed.
        case closed
    }

    public let configuration: Configuration
    public weak var delegate: (any TunnelSessionDelegate)?
    /// Set as the multiplexer's delegate when the handshake creates it.
    public weak var multiplexerDelegate: (any MultiplexerDelegate)?
    public private(set) var phase: Phase = .handshaking
    /// The stream multiplexer, once the handshake has finished.
    public private(set) var multiplexer: Multiplexer?
    /// What the handshake established.
    public private(set) var established: EstablishedSession?
    /// The connection timers.
    public private(set) var timers: ConnectionTimers
    /// Server: the client's first record has authenticated.
    public private(set) var isConfirmed = false
    /// Whether the connection below can take more bytes now (told to the multiplexer when it is made).
    public var isWritable = true
    private var role: Role
    private var sealer: RecordSealer?
    private var opener: RecordOpener?
    /// The last record's plaintext buffer, reused for the next record when no frame of it is still held.
    private var plaintextScratch: ByteBuffer?
    /// The start of a message whose rest has not arrived yet.
    private var partialMessage: ByteBuffer?
    /// Resumable session: the id the server gave it in message 2 (§7.2).
    public private(set) var sessionID: [UInt8]?
    /// Resumable session (§7.1): the records sent and not yet acknowledged; nil when the feature is off.
    public private(set) var retention: RecordRetention?
    /// Resumable session: the peer's records processed, and the count last acknowledged to it.
    public private(set) var processedRecords: UInt64 = 0
    private var acknowledgedToPeer: UInt64 = 0
    /// The secret a later connection proves this session with (§7.2), while it is resumable.
    public private(set) var resumptionSecret: SecretBytes?
    /// Client: a new connection carries this session on; RESUME goes (or went) out once its handshake is done.
    private var reconnecting = false
    /// Client: RESUME is out; nothing else goes out until the answer.
    private var awaitingResumed = false
    /// Records kept from before a resume that go out again first, in order.
    private var replay = CircularBuffer<ByteBuffer>()
    /// Plaintext bytes of the records the last resume sent again (its log line).
    public private(set) var lastReplayBytes = 0

    public init(role: Role, configuration: Configuration, now: NIODeadline) {
        self.role = role
        self.configuration = configuration
        self.timers = ConnectionTimers(configuration: configuration.timers, now: now)
    }

    public var isClient: Bool {
        if case .client = self.role { true } else { false }
    }

    /// Sending rekeys so far (tests, status).
    public var sendRekeys: Int { self.sealer?.rekeyCount ?? 0 }
    /// Receiving rekeys so far.
    public var receiveRekeys: Int { self.opener?.rekeyCount ?? 0 }

    // MARK: - Events in

    /// The connection is up. A client sends message 1, stamped with `wallClock` (nanoseconds since 1970: the
    /// server orders a key's handshakes by it, across restarts).
    public func start(now: NIODeadline, wallClock: UInt64) throws(ProtocolError) {
        self.timers.started(now: now)
        guard case .client(var machine) = self.role else { return }
        let message = try machine.start(timestamp: TAI64N(unixNanoseconds: wallClock))
        self.role = .client(machine)
        self.delegate?.session(self, send: message)
    }

    /// Bytes arrived at `now` (before they are processed: a record's time is its read's).
    public func noteReceive(now: NIODeadline) {
        self.timers.received(now: now)
    }

    /// The length of the message at the front of `buffer` is acceptable to wait for (false: `receive` will
    /// fail on it, so there is no point collecting it).
    public func acceptsLength(of partial: ByteBuffer) -> Bool {
        guard let length = try? RecordFraming.nextLength(in: partial) else { return false }
        return self.phase != .handshaking || length <= self.configuration.maxHandshakeMessage
    }

    /// Bytes of the connection, as they were read: processes every whole message and keeps the start of an
    /// incomplete one for the next read. Throws on anything the peer got wrong: the connection must then end
    /// at once.
    public func received(_ bytes: ByteBuffer) throws(ProtocolError) {
        var buffer = bytes
        if var partial = self.partialMessage {
            // Complete the one message that straddles the read boundary by copying only what it still lacks;
            // everything after it is processed in place, without a copy.
            self.partialMessage = nil
            while true {
                let missing = Self.bytesMissing(in: partial)
                if missing == 0 { break }
                // A length not worth waiting for: `receive` reports it.
                if partial.readableBytes >= 2 && !self.acceptsLength(of: partial) { break }
                let take = min(missing, buffer.readableBytes)
                if take > 0 { partial.writeImmutableBuffer(buffer.readSlice(length: take)!) }
                if take < missing {
                    self.partialMessage = partial
                    return
                }
            }
            try self.receive(&partial)
            guard self.phase != .closed else { return }
        }
        try self.receive(&buffer)
        if buffer.readableBytes > 0 && self.phase != .closed {
            // Keep the partial message in a buffer of its own, sized for the whole message.
            let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self)
            let needed = length.map { 2 + Int($0) } ?? (2 + WireLimits.maxRecordCiphertext)
            var partial = ByteBufferAllocator().buffer(capacity: max(needed, buffer.readableBytes))
            partial.writeBuffer(&buffer)
            self.partialMessage = partial
        }
    }

    /// How many more bytes `partial` needs to hold one whole message (its 2-byte length first).
    private static func bytesMissing(in partial: ByteBuffer) -> Int {
        guard let length = partial.getInteger(at: partial.readerIndex, as: UInt16.self) else {
            return 2 - partial.readableBytes
        }
        return max(0, 2 + Int(length) - partial.readableBytes)
    }

    /// Processes every whole message at the front of `buffer` (handshake messages, then records), leaving a
    /// partial one in it. Throws on anything the peer got wrong: the connection must then end at once.
    public func receive(_ buffer: inout ByteBuffer) throws(ProtocolError) {
        while self.phase != .closed {
            guard let length = try RecordFraming.nextLength(in: buffer) else { return }
            if self.phase == .handshaking && length > self.configuration.maxHandshakeMessage {
                throw ProtocolError.handshakeFailed("handshake message of \(length) bytes is too long")
            }
            guard buffer.readableBytes >= 2 + length else { return }
            switch self.phase {
            case .handshaking:
                buffer.moveReaderIndex(forwardBy: 2)
                let message = buffer.readBytes(length: length)!
                try self.receivedHandshakeMessage(message)
            case .established:
                try self.receivedRecord(&buffer, length: length)
            case .closed:
                return
            }
        }
    }

    private func receivedRecord(_ buffer: inout ByteBuffer, length: Int) throws(ProtocolError) {
        var plaintext = Self.reuse(&self.plaintextScratch, capacity: max(length, 2048))
        var failure: ProtocolError?
        buffer.withUnsafeReadableBytes { raw in
            do throws(ProtocolError) {
                try self.opener!.open(UnsafeRawBufferPointer(rebasing: raw[2..<(2 + length)]), appendingTo: &plaintext)
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        buffer.moveReaderIndex(forwardBy: 2 + length)
        if let type = plaintext.getInteger(at: plaintext.readerIndex, as: UInt8.self),
            type == FrameType.resume.rawValue || type == FrameType.resumed.rawValue
        {
            try self.receivedResumeRecord(&plaintext)
            Self.keep(plaintext, in: &self.plaintextScratch)
            return
        }
        if self.awaitingResumed {
            throw ProtocolError.malformedRecord("a record came before the answer to RESUME")
        }
        // The time of this read: one clock read per read, not one per record.
        let outcome = try self.multiplexer!.receivedRecord(&plaintext, now: self.timers.lastReceive)
        Self.keep(plaintext, in: &self.plaintextScratch)
        if self.retention != nil {
            self.processedRecords += 1
            if let count = outcome.acknowledged { try self.retention!.acknowledge(through: count) }
        }
        if !self.isConfirmed {
            self.isConfirmed = true
            self.delegate?.sessionConfirmed(self)
        }
        if outcome.rekey { self.opener!.rekey() }
        if let code = outcome.close {
            self.phase = .closed
            self.delegate?.session(self, peerClosed: code)
        }
    }

    private func receivedHandshakeMessage(_ message: [UInt8]) throws(ProtocolError) {
        switch self.role {
        case .client(var machine):
            let session = try machine.receivedResponse(message)
            self.role = .client(machine)
            if self.reconnecting {
                try self.reestablish(session)
            } else {
                self.establish(session)
                // Key confirmation for the server, and the first RTT sample.
                self.multiplexer!.sendPing(now: self.timers.lastReceive)
            }
        case .server(var machine):
            let initiation = try machine.receivedInitiation(message) { key in
                self.delegate?.sessionAuthorize(key) ?? false
            }
            switch self.delegate?.sessionCheckReplay(key: initiation.clientKey, timestamp: initiation.timestamp)
                ?? .replay
            {
            case .accept: break
            case .replay:
                throw ProtocolError.replayedHandshake(
                    "client \(initiation.clientKey) sent a timestamp not newer than its last handshake (replay, or its clock went back)"
                )
            case .flood:
                throw ProtocolError.replayedHandshake("client \(initiation.clientKey) is handshaking too fast")
            }
            let accepted = Self.agreedFeatures(
                offered: initiation.parameters.features,
                configuration: self.configuration
            )
            var parameters = Multiplexer.announcedParameters(for: self.configuration.multiplexer, features: accepted)
            if accepted.contains(.resumption) {
                let id = secureRandomBytes(count: SessionResumption.sessionIDLength)
                parameters.sessionID = id
                self.sessionID = id
            }
            let (response, session) = try machine.respond(parameters: parameters)
            self.role = .server(machine)
            self.delegate?.session(self, send: response)
            self.establish(session)
        }
    }

    /// The one rule of feature agreement: a feature is on when this side wants (client) or allows (server) it
    /// and the other side's handshake carries it. The server grants what the client asked and it allows; the
    /// client takes what the server granted and it asked for.
    public static func agreedFeatures(offered: SessionFeatures, configuration: Configuration) -> SessionFeatures {
        configuration.features.intersection(offered)
    }

    private func establish(_ session: EstablishedSession) {
        let now = self.timers.lastReceive
        self.established = session
        self.sealer = RecordSealer(cipher: session.transport.send, policy: self.configuration.rekeyPolicy, now: now)
        self.opener = RecordOpener(cipher: session.transport.receive)
        var muxConfiguration = self.configuration.multiplexer
        let features = Self.agreedFeatures(offered: session.peerParameters.features, configuration: self.configuration)
        muxConfiguration.compression = features.contains(.compression)
        muxConfiguration.fullTunnel = features.contains(.fullTunnel)
        muxConfiguration.datagramCredit = features.contains(.datagramCredit)
        muxConfiguration.packetOffload = features.contains(.packetOffload) && features.contains(.fullTunnel)
        muxConfiguration.earlyData = features.contains(.earlyData)
        if self.isClient { self.sessionID = session.peerParameters.sessionID }
        // A server that grants resumption names the session; without a name there is nothing to resume.
        muxConfiguration.resumption = features.contains(.resumption) && self.sessionID != nil
        if muxConfiguration.resumption {
            self.retention = RecordRetention()
            self.resumptionSecret = session.transport.resumptionSecret
        }
        let mux = Multiplexer(
            role: self.isClient ? .client : .server,
            configuration: muxConfiguration,
            peerParameters: session.peerParameters
        )
        mux.delegate = self.multiplexerDelegate
        mux.tunnelWritabilityChanged(self.isWritable)
        self.multiplexer = mux
        self.phase = .established
        self.timers.established(now: now)
        self.delegate?.session(self, established: session)
    }

    // MARK: - Records out

    /// Whether records are waiting to be produced.
    public var hasOutput: Bool {
        guard self.phase == .established, let mux = self.multiplexer, !self.awaitingResumed else { return false }
        if !self.replay.isEmpty { return true }
        if let retention = self.retention, retention.bytes >= self.configuration.maxRetainedBytes { return false }
        return mux.hasOutput || self.acknowledgementDue
    }

    /// Enough of the peer's records came in unacknowledged that a record goes out for RECEIVED alone.
    private var acknowledgementDue: Bool {
        self.retention != nil && self.processedRecords - self.acknowledgedToPeer >= self.configuration.acknowledgeEvery
    }

    /// A guess at the bytes `produceRecords` would write now (for sizing the buffer).
    public var queuedOutputBytes: Int { self.multiplexer?.queuedOutputBytes ?? 0 }

    /// Appends sealed records of what the multiplexer has queued until `buffer` holds at least `batchBytes`
    /// or nothing is left. A record that is due to rekey carries REKEY and the sending key changes after it.
    ///
    /// Records carry at most `recordBytes` of frames (smaller records leave the scheduler more say on a slow
    /// link), except that a frame that cannot be split (a datagram, an IP packet) always fits its record.
    public func produceRecords(
        into buffer: inout ByteBuffer,
        batchBytes: Int,
        recordBytes: Int = WireLimits.maxRecordFrameBytes,
        now: NIODeadline
    ) throws(ProtocolError) {
        guard self.phase == .established, let mux = self.multiplexer else { return }
        let resumable = self.retention != nil
        // Room for a RECEIVED frame beside the frames.
        let reserve = resumable ? FrameHeader.byteCount + 8 : 0
        if self.awaitingResumed { return }
        // Records kept from before a resume go first, in their order (they keep their numbers), as much of
        // them as the batch takes.
        while let plaintext = self.replay.first, buffer.readableBytes < batchBytes {
            self.replay.removeFirst()
            let start = self.sealer!.beginRecord(in: &buffer)
            buffer.writeImmutableBuffer(plaintext)
            try self.sealRecord(in: &buffer, start: start, now: now)
        }
        while buffer.readableBytes < batchBytes && self.replay.isEmpty {
            if resumable && self.retention!.bytes >= self.configuration.maxRetainedBytes { return }
            let start = self.sealer!.beginRecord(in: &buffer)
            let unsplittable = mux.nextUnsplittableFrameBytes
            var limit = min(WireLimits.maxRecordFrameBytes, max(recordBytes, unsplittable))
            // The reserve gives way only to a frame that cannot be split and needs the whole record.
            if resumable { limit = max(min(limit, WireLimits.maxRecordFrameBytes - reserve), unsplittable) }
            guard mux.produceRecord(into: &buffer, limit: limit, now: now) || self.acknowledgementDue else {
                buffer.moveWriterIndex(to: start)
                return
            }
            if resumable {
                let used = buffer.writerIndex - start - 2
                if self.processedRecords > self.acknowledgedToPeer && used + reserve <= WireLimits.maxRecordFrameBytes {
                    mux.writeReceivedFrame(count: self.processedRecords, into: &buffer)
                    self.acknowledgedToPeer = self.processedRecords
                }
                // Kept before a REKEY frame joins it: that frame belongs to this connection's keys.
                buffer.withUnsafeReadableBytes { raw in
                    let offset = start + 2 - buffer.readerIndex
                    self.retention!.append(copying: UnsafeRawBufferPointer(rebasing: raw[offset...]))
                }
            }
            try self.sealRecord(in: &buffer, start: start, now: now)
        }
    }

    /// Seals the record begun at `start`; one that is due to rekey ends with REKEY, and the sending key
    /// changes after it.
    private func sealRecord(in buffer: inout ByteBuffer, start: Int, now: NIODeadline) throws(ProtocolError) {
        let rekey = self.sealer!.needsRekey(now: now)
        if rekey { self.multiplexer!.writeRekeyFrame(into: &buffer) }
        try self.sealer!.sealRecord(in: &buffer, start: start)
        if rekey { self.sealer!.rekey(now: now) }
    }

    /// Ends the session with an authenticated CLOSE: aborts the open streams (what they still had queued is
    /// dropped: produce the records worth sending first) and appends the record that carries CLOSE. Nothing
    /// is sent or processed after it.
    public func close(code: ErrorCode, into buffer: inout ByteBuffer) throws(ProtocolError) {
        self.drainDeadline = nil
        guard self.phase == .established, let mux = self.multiplexer else {
            self.phase = .closed
            return
        }
        self.phase = .closed
        mux.abortAllStreams(code: .shutdown)
        let start = self.sealer!.beginRecord(in: &buffer)
        mux.writeCloseFrame(code: code, into: &buffer)
        try self.sealer!.sealRecord(in: &buffer, start: start)
    }

    /// The session failed or its connection is gone: open streams are aborted with `code`.
    public func abort(code: ErrorCode) {
        self.phase = .closed
        self.isDetached = false
        self.reconnecting = false
        self.awaitingResumed = false
        self.retention = nil
        self.resumptionSecret = nil
        self.drainDeadline = nil
        self.multiplexer?.abortAllStreams(code: code)
    }

    // MARK: - Resumption (docs/PROTOCOL.md §7.3)

    /// The keys and state of one connection, handed from the session that made its handshake to the
    /// session it resumes (server).
    public struct Connection: @unchecked Sendable {
        fileprivate var sealer: RecordSealer
        fileprivate var opener: RecordOpener
        fileprivate var established: EstablishedSession
        fileprivate var timers: ConnectionTimers
    }

    /// Whether this session can be resumed on another connection.
    public var isResumable: Bool {
        self.retention != nil && self.sessionID != nil && self.resumptionSecret != nil && self.multiplexer != nil
    }

    /// Whether the connection is gone and the session waits for another (`detach`).
    public private(set) var isDetached = false

    /// Client: a new connection is carrying this session on and has not been answered yet.
    public var isReconnecting: Bool { self.reconnecting || self.awaitingResumed }

    /// What a server keeps to check a RESUME for this session against.
    public var resumeCandidate: ResumeCandidate? {
        guard self.isResumable, let key = self.established?.peerStaticKey else { return nil }
        return ResumeCandidate(sessionID: self.sessionID!, clientKey: key, secret: self.resumptionSecret!)
    }

    /// The connection broke without a CLOSE: a resumable session keeps its streams, their queued bytes and
    /// its kept records for another connection (`reconnect`, `takeConnection`); nothing is sent meanwhile.
    /// Returns false (and changes nothing) when the session is not resumable: abort it then.
    /// A reconnect that failed (the handshake, or no answer to RESUME) detaches the session again.
    public func detach() -> Bool {
        guard self.isResumable, self.phase != .closed || self.isDetached else { return false }
        self.reconnecting = false
        self.awaitingResumed = false
        self.phase = .closed
        self.isDetached = true
        self.sealer = nil
        self.opener = nil
        self.partialMessage = nil
        self.replay.removeAll()
        return true
    }

    /// Client, for a detached session: a new connection, with `machine` for its handshake; `start` it.
    /// Once the handshake is done the first record asks to resume, and nothing else goes out until the
    /// server answers.
    public func reconnect(_ machine: ClientHandshakeStateMachine, now: NIODeadline) {
        precondition(self.isClient && self.isDetached)
        self.role = .client(machine)
        self.phase = .handshaking
        self.reconnecting = true
        self.timers = ConnectionTimers(configuration: self.configuration.timers, now: now)
    }

    /// Client: the new connection's handshake is done; RESUME goes out.
    private func reestablish(_ session: EstablishedSession) throws(ProtocolError) {
        let now = self.timers.lastReceive
        self.reconnecting = false
        self.established = session
        self.sealer = RecordSealer(cipher: session.transport.send, policy: self.configuration.rekeyPolicy, now: now)
        self.opener = RecordOpener(cipher: session.transport.receive)
        self.phase = .established
        self.isDetached = false
        self.timers.established(now: now)
        let agreed = Self.agreedFeatures(offered: session.peerParameters.features, configuration: self.configuration)
        guard agreed.contains(.resumption), let id = self.sessionID, let secret = self.resumptionSecret else {
            // The server no longer grants resumption: nothing to ask.
            self.refused(status: ResumeStatus.unknown)
            return
        }
        let proof = SessionResumption.proof(
            secret: secret,
            sessionID: id,
            handshakeHash: session.transport.handshakeHash
        )
        try self.sendAlone(.resume, length: 16 + 8 + 32) { record in
            record.writeBytes(id)
            record.writeInteger(self.processedRecords)
            record.writeBytes(proof)
        }
        self.awaitingResumed = true
    }

    /// Sends a record that carries one frame of stream 0 alone, not numbered (RESUME, RESUMED).
    private func sendAlone(
        _ type: FrameType,
        length: Int,
        payload: (inout ByteBuffer) -> Void
    ) throws(ProtocolError) {
        var record = ByteBuffer()
        let start = self.sealer!.beginRecord(in: &record)
        record.writeFrameHeader(FrameHeader(type: type, streamID: .connection, length: length))
        payload(&record)
        try self.sealer!.sealRecord(in: &record, start: start)
        self.delegate?.session(self, send: record)
    }

    private func refused(status: UInt8) {
        self.abort(code: .cancel)
        self.delegate?.session(self, resumeRefused: status)
    }

    private func sendResumed(status: UInt8) throws(ProtocolError) {
        try self.sendAlone(.resumed, length: 9) { record in
            record.writeInteger(status)
            record.writeInteger(self.processedRecords)
        }
    }

    /// A record that carries RESUME or RESUMED, alone (it is not numbered).
    private func receivedResumeRecord(_ record: inout ByteBuffer) throws(ProtocolError) {
        guard let frame = try record.readFrame(), record.readableBytes == 0 else {
            throw ProtocolError.malformedRecord("RESUME and RESUMED travel alone in their record")
        }
        var payload = frame.payload
        guard frame.header.streamID == .connection else {
            throw ProtocolError.malformedFrame("\(frame.header.type) on stream \(frame.header.streamID)")
        }
        if frame.header.type == .resume {
            guard !self.isClient, !self.isConfirmed, payload.readableBytes == 16 + 8 + 32,
                let id = payload.readBytes(length: 16), let count = payload.readInteger(as: UInt64.self),
                let proof = payload.readBytes(length: 32)
            else {
                throw ProtocolError.malformedFrame("RESUME must be the client's first record, of 56 bytes")
            }
            self.isConfirmed = true
            try self.serveResume(id: id, count: count, proof: proof)
        } else {
            guard self.isClient, self.awaitingResumed, payload.readableBytes == 9,
                let status = payload.readInteger(as: UInt8.self), let count = payload.readInteger(as: UInt64.self)
            else {
                throw ProtocolError.malformedFrame("RESUMED must answer a RESUME, in 9 bytes")
            }
            self.awaitingResumed = false
            if status == ResumeStatus.resumed {
                try self.resumed(peerCount: count)
            } else {
                self.refused(status: status)
            }
        }
    }

    /// Server: checks a RESUME. Refused, this session goes on as a new one (and says so); accepted, it hands
    /// its connection to the runtime for the session it resumes, and is spent.
    private func serveResume(id: [UInt8], count: UInt64, proof: [UInt8]) throws(ProtocolError) {
        guard let established = self.established, self.retention != nil,
            let candidate = self.delegate?.sessionResumeCandidate(id: id, key: established.peerStaticKey),
            candidate.sessionID == id, candidate.clientKey == established.peerStaticKey
        else {
            try self.sendResumed(status: ResumeStatus.unknown)
            self.delegate?.sessionConfirmed(self)
            return
        }
        guard
            SessionResumption.verify(
                proof,
                secret: candidate.secret,
                sessionID: id,
                handshakeHash: established.transport.handshakeHash
            )
        else {
            try self.sendResumed(status: ResumeStatus.refused)
            self.delegate?.sessionConfirmed(self)
            return
        }
        let connection = Connection(
            sealer: self.sealer!,
            opener: self.opener!,
            established: established,
            timers: self.timers
        )
        self.phase = .closed
        self.sealer = nil
        self.opener = nil
        self.delegate?.session(self, resumeAccepted: candidate, connection: connection, peerCount: count)
    }

    /// Server: this session (detached, or still on a connection the runtime has given up) goes on over
    /// `connection`, whose client proved it may resume it and has processed `peerCount` of its records:
    /// RESUMED goes out, then the kept records after that count.
    /// Throws when the session was given up meanwhile (the connection must then close: its client will find
    /// the session unknown on its next attempt).
    public func takeConnection(_ connection: Connection, peerCount: UInt64) throws(ProtocolError) {
        guard !self.isClient, self.isResumable else {
            throw ProtocolError.malformedRecord("the session to resume was given up meanwhile")
        }
        self.sealer = connection.sealer
        self.opener = connection.opener
        self.established = connection.established
        self.timers = connection.timers
        self.partialMessage = nil
        self.phase = .established
        self.isDetached = false
        self.isConfirmed = true
        try self.sendResumed(status: ResumeStatus.resumed)
        try self.resumed(peerCount: peerCount)
    }

    /// Both ends, the exchange done: the kept records after the peer's count go out again first.
    private func resumed(peerCount: UInt64) throws(ProtocolError) {
        try self.retention!.acknowledge(through: peerCount)
        self.replay = CircularBuffer(try self.retention!.records(after: peerCount))
        self.lastReplayBytes = self.replay.reduce(0) { $0 + $1.readableBytes }
        self.acknowledgedToPeer = self.processedRecords
        self.multiplexer?.tunnelWritabilityChanged(self.isWritable)
        self.delegate?.session(self, resumed: self.replay.count)
    }

    // MARK: - Drain

    /// While the session drains: when it closes even if streams are still open.
    public private(set) var drainDeadline: NIODeadline?

    /// Whether the session drains (GOAWAY sent: no new streams, CLOSE once the last one has finished).
    public var isDraining: Bool { self.drainDeadline != nil }

    /// Whether a stream can be opened now (established, not draining, an id and a slot free).
    public var canOpenStream: Bool {
        self.phase == .established && self.drainDeadline == nil && self.multiplexer?.canOpenStream == true
    }

    /// A graceful end (docs/PROTOCOL.md §3.6): GOAWAY goes out now and no stream opens after it; the open
    /// ones run on until they finish or `deadline` passes (`drainCloseDue`). Returns false when there is
    /// nothing to drain (not established): close at once. A second call keeps the earlier deadline.
    public func beginDrain(deadline: NIODeadline) -> Bool {
        guard self.phase == .established, let mux = self.multiplexer else { return false }
        if let current = self.drainDeadline {
            self.drainDeadline = min(current, deadline)
            return true
        }
        self.drainDeadline = deadline
        mux.goAway(code: .shutdown)
        return true
    }

    /// The CLOSE a drain calls for at `now`: `.noError` once every stream has finished, `.shutdown` when
    /// the deadline passed with streams still open, nil otherwise (or when not draining).
    public func drainCloseDue(now: NIODeadline) -> ErrorCode? {
        guard let deadline = self.drainDeadline, self.phase == .established, let mux = self.multiplexer else {
            return nil
        }
        if mux.streamCount == 0 { return .noError }
        return now >= deadline ? .shutdown : nil
    }

    /// When the driver should call `tick` next: the timers' interval, or the drain deadline if sooner.
    public func nextTick(after now: NIODeadline) -> NIODeadline {
        let regular = now + self.timers.tickInterval
        guard let deadline = self.drainDeadline else { return regular }
        return min(regular, deadline)
    }

    // MARK: - Timers

    /// Runs the connection timers at `now`: a PING when idle, upkeep, and a rekey due by time. Throws when the
    /// handshake timed out or the peer is dead (the connection must end).
    public func tick(now: NIODeadline) throws(ProtocolError) {
        guard self.phase != .closed else { return }
        for action in self.timers.tick(now: now) {
            switch action {
            case .handshakeTimedOut:
                throw ProtocolError.handshakeFailed("handshake timed out")
            case .dead(let idle):
                throw ProtocolError.truncated(
                    "nothing received for \(idle.nanoseconds / 1_000_000_000) s: tunnel is dead"
                )
            case .sendPing:
                self.multiplexer?.sendPing(now: now)
            case .upkeep:
                self.multiplexer?.releaseIdleCompressionContexts(now: now)
                if self.sealer?.needsRekey(now: now) == true {
                    // A record carries the REKEY; a PING makes sure there is one even when idle.
                    self.multiplexer?.sendPing(now: now)
                }
            }
        }
    }

    // MARK: - Buffers

    /// Largest record buffer kept for reuse: small records are the latency path; an idle connection should not
    /// keep a big buffer.
    static let reusableCapacity = 16 << 10

    /// An empty buffer of at least `capacity` bytes: the one `kept` (which it empties) when nothing else holds
    /// it any more and it is big enough, else a new one.
    public static func reuse(_ kept: inout ByteBuffer?, capacity: Int) -> ByteBuffer {
        if var previous = kept {
            kept = nil
            if previous.modifyIfUniquelyOwned({
                $0.clear()
                return $0.capacity >= capacity
            }) == true {
                return previous
            }
        }
        return ByteBufferAllocator().buffer(capacity: capacity)
    }

    /// Keeps `buffer` for the next `reuse` if it is small.
    public static func keep(_ buffer: ByteBuffer, in kept: inout ByteBuffer?) {
        if buffer.capacity <= Self.reusableCapacity { kept = buffer }
    }
}
