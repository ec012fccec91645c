import NIOCore
import TunnelCompression

/// What a record asked of the record layer, beyond its frames.
public struct RecordOutcome: Hashable, Sendable {
    /// The record ended with REKEY: rekey the receiving direction now.
    public var rekey = false
    /// The record ended with CLOSE: the peer ends the connection with this code.
    public var close: ErrorCode? = nil
    /// The record carried RECEIVED (docs/PROTOCOL.md §7.1): the peer processed our records 1 ... this.
    public var acknowledged: UInt64? = nil
    public init() {}
}

extension Multiplexer {
    // MARK: - Receiving frames

    /// Processes one decrypted record. Throws on any protocol violation; the connection must then end.
    public func receivedRecord(_ record: inout ByteBuffer, now: NIODeadline) throws(ProtocolError) -> RecordOutcome {
        self.advanceClock(to: now)
        let recordSize = record.readableBytes
        var outcome = RecordOutcome()
        while let frame = try record.readFrame() {
            let header = frame.header
            let payload = frame.payload
            if outcome.rekey || outcome.close != nil {
                throw ProtocolError.malformedRecord(
                    "a frame follows \(outcome.rekey ? "REKEY" : "CLOSE") in its record"
                )
            }
            switch header.type {
            case .data: try self.receivedData(header, payload, recordSize: recordSize, now: now)
            case .open: try self.receivedOpen(header, payload)
            case .openResult: try self.receivedOpenResult(header, payload)
            case .windowUpdate: try self.receivedWindowUpdate(header, payload)
            case .reset: try self.receivedReset(header, payload)
            case .goAway: try self.receivedGoAway(payload)
            case .ping: try self.receivedPing(header, payload, now: now)
            case .rekey: outcome.rekey = true
            case .close:
                var payload = payload
                outcome.close = ErrorCode(rawValue: payload.readInteger(as: UInt32.self) ?? 0)
            case .datagram: try self.receivedDatagram(header, payload, now: now)
            case .ipPacket:
                guard header.streamID == .connection else {
                    throw ProtocolError.invalidStreamID("IP_PACKET on stream \(header.streamID)")
                }
                // Ignored unless full-tunnel mode was negotiated.
                if self.configuration.fullTunnel, payload.readableBytes > 0 {
                    if self.configuration.packetOffload && !Self.offloadHeaderIsAcceptable(payload) {
                        self.refusedPackets += 1
                    } else {
                        self.delegate?.multiplexer(self, receivedIPPacket: payload)
                    }
                }
            case .control:
                guard header.streamID == .connection else {
                    throw ProtocolError.invalidStreamID("CONTROL on stream \(header.streamID)")
                }
                try self.delegate?.multiplexer(self, receivedControl: payload)
            case .padding:
                break
            case .received:
                var payload = payload
                guard self.configuration.resumption, header.streamID == .connection,
                    payload.readableBytes == 8, let count = payload.readInteger(as: UInt64.self)
                else {
                    throw ProtocolError.malformedFrame("RECEIVED must be 8 bytes on stream 0 of a resumable session")
                }
                outcome.acknowledged = max(outcome.acknowledged ?? 0, count)
            default:
                guard header.type.rawValue >= FrameType.firstExtension else {
                    throw ProtocolError.unknownFrameType(header.type)
                }
            }
        }
        return outcome
    }

    /// Frames for a stream id that is not in the table: fine if the stream existed once (late frames after a
    /// close), a protocol error if it was never opened.
    private func checkUnknownStream(_ id: StreamID) throws(ProtocolError) {
        guard id != .connection else { throw ProtocolError.invalidStreamID("stream frame on stream 0") }
        let isLocal = id.isClientInitiated == (self.role == .client)
        let known = isLocal ? id.rawValue < self.nextLocalStreamIDValue : id <= self.lastPeerStreamID
        guard known else { throw ProtocolError.invalidStreamID("frame for stream \(id), which was never opened") }
    }

    private func receivedData(
        _ header: FrameHeader,
        _ payload: ByteBuffer,
        recordSize: Int,
        now: NIODeadline
    ) throws(ProtocolError) {
        var payload = payload
        let compressed = header.flags.contains(.compressed)
        // Credit is counted in plaintext bytes: a compressed frame declares its original length up front, so
        // even frames for streams that are already gone are accounted exactly.
        var count = payload.readableBytes
        if compressed {
            guard self.configuration.compression else {
                throw ProtocolError.malformedFrame("compressed DATA, but compression was not negotiated")
            }
            guard let original = payload.readInteger(as: UInt16.self),
                Int(original) <= self.configuration.compressedFrameLimit
            else {
                throw ProtocolError.malformedFrame(
                    "compressed DATA declares more than \(self.configuration.compressedFrameLimit) bytes"
                )
            }
            count = Int(original)
        }
        if count > 0 { try self.connectionReceiveWindow.received(count) }
        guard let stream = self.streams[header.streamID.rawValue] else {
            try self.checkUnknownStream(header.streamID)
            if count > 0 { self.consumeConnection(count, now: now) }
            return
        }
        switch stream.state {
        case .opening:
            // With early data the opener may send before this side answered; never the other way round.
            guard self.configuration.earlyData, self.role == .server, stream.id.isClientInitiated,
                stream.kind == .tcp
            else {
                throw ProtocolError.flowControl("DATA on stream \(stream.id) before it was open")
            }
        case .closed:
            if count > 0 { self.consumeConnection(count, now: now) }
            return
        case .open, .halfClosedLocal, .halfClosedRemote:
            break
        }
        if compressed {
            payload = try self.inflate(payload, declared: count, header: header, stream: stream, now: now)
        }
        guard !stream.finReceived else {
            throw ProtocolError.malformedFrame("DATA on stream \(stream.id) after its FIN")
        }
        if count > 0 {
            try stream.receiveWindow.received(count)
            stream.bytesReceived += count
            self.payloadBytesReceived += count
            self.bufferedReceiveBytes += count
            if self.bufferedReceiveBytes <= self.configuration.maxBufferedBytes {
                self.consumeConnection(count, now: now)
            } else {
                stream.connectionCreditOwed += count
            }
            // A slice keeps its whole record alive. Small frames in a shared record are copied, so a stalled
            // reader pins at most about twice what its window allows. (Inflated data is a buffer of its own.)
            let data = compressed || count * 2 >= recordSize ? payload : ByteBuffer(buffer: payload)
            if stream.state == .opening {
                // Early data: held until the stream opens (`completeOpen`), within its window.
                stream.earlyReceived.append(data)
            } else {
                self.delegate?.multiplexer(self, received: data, on: stream)
            }
        }
        if header.flags.contains(.fin), stream.state == .opening {
            // Early data ended with the opener's FIN: the stream is half-closed once it opens.
            stream.earlyFinReceived = true
        } else if header.flags.contains(.fin), stream.state.isOpen {
            // The state changes before the delegate hears of it: the delegate may close the local socket (and
            // release the stream) from inside the call.
            if stream.state == .halfClosedLocal {
                self.markClosed(stream, reset: nil)
            } else {
                stream.state = .halfClosedRemote
                self.delegate?.multiplexer(self, receivedEndOfStream: stream)
            }
        }
    }

    /// Inflates a compressed frame with the stream's context (a new one when the frame starts one). The
    /// result must have exactly the declared length, which is at most the frame limit: a decompression bomb
    /// ends the connection after inflating no more than that.
    private func inflate(
        _ payload: ByteBuffer,
        declared: Int,
        header: FrameHeader,
        stream: MuxStream,
        now: NIODeadline
    ) throws(ProtocolError)
        -> ByteBuffer
    {
        if header.flags.contains(.compressionStart) {
            stream.inflater = Inflater()
            self.compressingStreams[stream.id.rawValue] = stream
        }
        guard let inflater = stream.inflater else {
            throw ProtocolError.malformedFrame("compressed DATA on stream \(stream.id) without a started context")
        }
        stream.lastInflate = now
        let output: ByteBuffer
        do {
            output = try inflater.inflate(payload, limit: declared, allocator: ByteBufferAllocator())
        } catch {
            throw ProtocolError.malformedFrame(
                "compressed DATA on stream \(stream.id) does not inflate to its declared \(declared) bytes (\(error))"
            )
        }
        guard output.readableBytes == declared else {
            throw ProtocolError.malformedFrame(
                "compressed DATA on stream \(stream.id) inflates to \(output.readableBytes), not \(declared) bytes"
            )
        }
        return output
    }

    private func receivedOpen(_ header: FrameHeader, _ payload: ByteBuffer) throws(ProtocolError) {
        let id = header.streamID
        guard self.role == .server, id.isClientInitiated else {
            throw ProtocolError.invalidStreamID("OPEN for stream \(id) from the wrong side")
        }
        guard id > self.lastPeerStreamID else {
            throw ProtocolError.invalidStreamID("OPEN for stream \(id) after \(self.lastPeerStreamID)")
        }
        self.lastPeerStreamID = id
        // Every OPEN gets one answer (OPEN_RESULT or RESET): a peer that opens without reading the answers
        // would grow the control queue without bound, as unread PING answers would.
        guard self.controlQueueBytes < self.configuration.maxQueuedControlBytes else {
            throw ProtocolError.resourceLimit("peer keeps opening streams without reading the answers")
        }
        var payload = payload
        guard let kindByte = payload.readInteger(as: UInt8.self), let window = payload.readInteger(as: UInt32.self)
        else {
            throw ProtocolError.malformedFrame("OPEN too short")
        }
        guard window <= UInt32(Int32.max) else { throw ProtocolError.flowControl("OPEN window \(window) past 2^31-1") }
        let target: TargetAddress
        do {
            guard let parsed = try payload.readTargetAddress() else {
                throw ProtocolError.malformedFrame("OPEN address truncated")
            }
            target = parsed
        } catch let error as TargetAddressError {
            let reply: ReplyCode =
                if case .unsupportedAddressType = error { .addressTypeNotSupported } else { .generalFailure }
            self.enqueueControl(.openResult(id, reply: reply, window: 0, bound: .unspecified))
            return
        } catch {
            throw ProtocolError.malformedFrame("OPEN address truncated")
        }
        guard !self.localGoingAway, self.peerStreamCount < self.configuration.maxConcurrentStreams else {
            self.enqueueControl(.reset(id, .refusedStream))
            return
        }
        let kind = StreamKind(rawValue: kindByte)
        guard kind == .tcp || kind == .udp else {
            self.enqueueControl(.openResult(id, reply: .commandNotSupported, window: 0, bound: .unspecified))
            return
        }
        let stream = self.makeStream(id, target: target, kind: kind)
        stream.sendCredit = SendCredit(Int(window))
        self.streams[id.rawValue] = stream
        self.peerStreamCount += 1
        self.delegate?.multiplexer(self, openRequested: stream)
    }

    private func receivedOpenResult(_ header: FrameHeader, _ payload: ByteBuffer) throws(ProtocolError) {
        var payload = payload
        guard let replyByte = payload.readInteger(as: UInt8.self), let window = payload.readInteger(as: UInt32.self)
        else {
            throw ProtocolError.malformedFrame("OPEN_RESULT too short")
        }
        guard window <= UInt32(Int32.max) else { throw ProtocolError.flowControl("OPEN_RESULT window past 2^31-1") }
        let bound = (try? payload.readTargetAddress()) ?? nil
        guard let stream = self.streams[header.streamID.rawValue] else {
            try self.checkUnknownStream(header.streamID)
            return
        }
        guard self.role == .client, stream.state == .opening || stream.state.isClosed || stream.awaitingOpenResult
        else {
            throw ProtocolError.malformedFrame("OPEN_RESULT for stream \(stream.id), which is not opening")
        }
        if stream.awaitingOpenResult {
            try self.receivedEarlyOpenResult(
                stream,
                reply: ReplyCode(rawValue: replyByte),
                window: window,
                bound: bound
            )
            return
        }
        guard stream.state == .opening else { return }
        let reply = ReplyCode(rawValue: replyByte)
        if reply == .succeeded {
            stream.state = .open
            stream.sendCredit = SendCredit(Int(window))
            self.delegate?.multiplexer(self, openCompleted: stream, reply: reply, bound: bound ?? .unspecified)
        } else {
            stream.state = .closed(reset: nil)
            self.delegate?.multiplexer(self, openCompleted: stream, reply: reply, bound: bound ?? .unspecified)
            self.release(stream)
        }
    }

    /// The answer to a stream opened with early data (`openStream(early:)`), which is open (or already closed)
    /// on this side. Success: the credit becomes the acceptor's window less what was sent early. Failure: the
    /// stream closes as if reset (`refusedStream`), after `openCompleted` has the reply.
    private func receivedEarlyOpenResult(
        _ stream: MuxStream,
        reply: ReplyCode,
        window: UInt32,
        bound: TargetAddress?
    ) throws(ProtocolError) {
        stream.awaitingOpenResult = false
        if reply == .succeeded {
            guard !stream.state.isClosed else { return }
            let sent = WireLimits.earlyDataWindow - stream.sendCredit.available
            guard Int(window) >= sent else {
                throw ProtocolError.flowControl(
                    "OPEN_RESULT window \(window) for stream \(stream.id) is below the \(sent) bytes sent early"
                )
            }
            let before = stream.sendCredit.available
            stream.sendCredit = SendCredit(Int(window) - sent)
            self.delegate?.multiplexer(self, openCompleted: stream, reply: reply, bound: bound ?? .unspecified)
            if stream.sendCredit.available > before { self.sendCreditGrew(stream, from: before) }
            return
        }
        self.delegate?.multiplexer(self, openCompleted: stream, reply: reply, bound: bound ?? .unspecified)
        self.markClosed(stream, reset: .refusedStream)
    }

    private func receivedWindowUpdate(_ header: FrameHeader, _ payload: ByteBuffer) throws(ProtocolError) {
        var payload = payload
        guard let increment = payload.readInteger(as: UInt32.self) else {
            throw ProtocolError.malformedFrame("WINDOW_UPDATE too short")
        }
        if header.streamID == .connection {
            let wasBlocked = self.connectionSendCredit.available == 0
            try self.connectionSendCredit.grant(increment)
            if wasBlocked {
                while let stream = self.streamsAwaitingConnectionCredit.popFirst() {
                    self.activeStreams.append(stream, now: self.clock)
                }
                if !self.activeStreams.isEmpty { self.delegate?.multiplexerHasOutput(self) }
                self.resumeBlockedReaders()
            }
            return
        }
        guard let stream = self.streams[header.streamID.rawValue] else {
            try self.checkUnknownStream(header.streamID)
            return
        }
        guard stream.state.isOpen else { return }
        let before = stream.sendCredit.available
        try stream.sendCredit.grant(increment)
        if stream.kind == .udp {
            // A UDP association's socket waits for credit (`shouldReadDatagrams`): it may read again.
            if stream.readBlocked && !self.datagramCreditShort(stream) {
                stream.readBlocked = false
                self.delegate?.multiplexer(self, streamWantsRead: stream)
            }
            return
        }
        self.sendCreditGrew(stream, from: before)
    }

    /// A TCP stream's send credit grew from `before`: its waiting bytes may go, and its socket may read again
    /// if the credit had run out under them.
    private func sendCreditGrew(_ stream: MuxStream, from before: Int) {
        self.clearCreditStalled(stream)
        self.schedule(stream)
        if before <= stream.pendingBytes, !stream.localEndOfStream {
            self.delegate?.multiplexer(self, streamWantsRead: stream)
        }
    }

    private func receivedReset(_ header: FrameHeader, _ payload: ByteBuffer) throws(ProtocolError) {
        var payload = payload
        guard let code = payload.readInteger(as: UInt32.self) else {
            throw ProtocolError.malformedFrame("RESET too short")
        }
        guard let stream = self.streams[header.streamID.rawValue] else {
            try self.checkUnknownStream(header.streamID)
            return
        }
        if stream.state == .opening && self.role == .client {
            stream.state = .closed(reset: ErrorCode(rawValue: code))
            self.delegate?.multiplexer(self, openCompleted: stream, reply: .generalFailure, bound: .unspecified)
            self.release(stream)
            return
        }
        self.markClosed(stream, reset: ErrorCode(rawValue: code))
    }

    private func receivedGoAway(_ payload: ByteBuffer) throws(ProtocolError) {
        var payload = payload
        guard let last = payload.readInteger(as: UInt32.self), let code = payload.readInteger(as: UInt32.self) else {
            throw ProtocolError.malformedFrame("GOAWAY too short")
        }
        self.peerGoingAway = true
        let lastID = StreamID(last)
        // Streams we opened above `last` were never seen by the peer: fail them here.
        let unserved = self.streams.values.filter {
            $0.id.isClientInitiated == (self.role == .client) && $0.id > lastID
                && ($0.state == .opening || $0.awaitingOpenResult)
        }
        for stream in unserved.sorted(by: { $0.id < $1.id }) {
            if stream.awaitingOpenResult {
                // Open on this side with early data: it ends as a refused stream, like a RESET.
                self.markClosed(stream, reset: .refusedStream)
                continue
            }
            stream.state = .closed(reset: .refusedStream)
            self.delegate?.multiplexer(self, openCompleted: stream, reply: .generalFailure, bound: .unspecified)
            self.release(stream)
        }
        self.delegate?.multiplexer(self, peerGoingAway: lastID, code: ErrorCode(rawValue: code))
    }

    private func receivedDatagram(
        _ header: FrameHeader,
        _ payload: ByteBuffer,
        now: NIODeadline
    ) throws(ProtocolError) {
        guard let stream = self.streams[header.streamID.rawValue] else {
            try self.checkUnknownStream(header.streamID)
            return  // the association ended while this datagram was in flight
        }
        guard stream.kind == .udp else { throw ProtocolError.malformedFrame("DATAGRAM on TCP stream \(stream.id)") }
        guard stream.state.isOpen else { return }
        self.datagramsReceived += 1
        if self.configuration.datagramCredit {
            // Handed on (sent, or dropped by the association) at once: the credit goes back as soon as half
            // the window has been handled, so no more than a window of datagrams is ever in flight.
            let count = payload.readableBytes
            try stream.receiveWindow.received(count)
            stream.context?.deliverDatagram(payload)
            if !stream.state.isClosed,
                let increment = stream.receiveWindow.consumed(count, now: now, roundTrip: self.minimumRoundTrip)
            {
                self.enqueueControl(.windowUpdate(stream.id, increment: increment))
            }
        } else {
            stream.context?.deliverDatagram(payload)
        }
    }

    private func receivedPing(_ header: FrameHeader, _ payload: ByteBuffer, now: NIODeadline) throws(ProtocolError) {
        var payload = payload
        guard payload.readableBytes == 8, let opaque = payload.readInteger(as: UInt64.self) else {
            throw ProtocolError.malformedFrame("PING payload must be 8 bytes")
        }
        if header.flags.contains(.ack) {
            self.notePong(opaque, now: now)
            return
        }
        guard self.controlQueueBytes < self.configuration.maxQueuedControlBytes else {
            throw ProtocolError.resourceLimit("peer keeps sending PINGs without reading the answers")
        }
        self.enqueueControl(.ping(opaque, ack: true))
    }
}

extension Multiplexer {
    /// Whether a device packet from the peer (offload header + IP packet) may go to this end's device
    /// (`PacketOffloadHeader.isAcceptable`).
    static func offloadHeaderIsAcceptable(_ payload: ByteBuffer) -> Bool {
        guard let header = PacketOffloadHeader(from: payload),
            let first = payload.getInteger(at: payload.readerIndex + PacketOffloadHeader.byteCount, as: UInt8.self)
        else { return false }
        return header.isAcceptable(
            ipVersion: first >> 4,
            packetLength: payload.readableBytes - PacketOffloadHeader.byteCount
        )
    }
}
