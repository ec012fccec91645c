import NIOCore
import TunnelCompression

extension Multiplexer {
    // MARK: - Producing records

    /// Appends the frames of one record to `buffer`, at most `limit` bytes: control frames first, then stream
    /// data by deficit round-robin, interactive streams before bulk ones (`StreamScheduler`; each stream up to
    /// `quantum` per turn, as far as its own and the connection's credit allow). Consecutive turns of the same
    /// stream extend its frame instead of adding a header. Returns whether anything was written.
    public func produceRecord(into buffer: inout ByteBuffer, limit: Int, now: NIODeadline) -> Bool {
        self.advanceClock(to: now)
        let start = buffer.writerIndex
        var space = limit

        while let frame = self.controlQueue.first {
            let size = frame.encodedLength
            guard size <= space else { break }
            self.controlQueue.removeFirst()
            self.controlQueueBytes -= size
            frame.write(into: &buffer)
            space -= size
        }

        // Datagrams next, but with at most half the record while streams have data, so neither UDP nor TCP
        // can starve the other; whatever room the streams leave goes to datagrams at the end.
        let firstDatagram = self.nextUnsplittableDatagramBytes
        let datagramBudget = self.activeStreams.isEmpty ? space : max(space / 2, min(space, firstDatagram))
        space -= datagramBudget - self.writeDatagrams(into: &buffer, budget: datagramBudget)

        var lastStream: MuxStream? = nil
        var lastLengthIndex = 0
        var lastLength = 0
        let pendingBefore = self.sendablePendingBytes
        // A control frame that did not fit may be the OPEN of a stream with early data: no stream data may
        // overtake it. (It happens only when the record is all but full anyway.)
        while space > 0, self.controlQueue.isEmpty, let stream = self.activeStreams.next() {
            stream.scheduled = false
            guard stream.hasSendableWork else { continue }
            let extending = lastStream === stream
            let room = extending ? min(space, WireLimits.maxFramePayload - lastLength) : space - FrameHeader.byteCount
            if room <= 0 && !(extending && stream.pendingBytes == 0) {
                // No room left in this record: the stream keeps its place at the front.
                stream.scheduled = true
                self.activeStreams.putBack(stream)
                break
            }
            let deflater = self.deflater(for: stream)
            // A compressed frame needs room for the deflate bound, never extends, and holds at most the limit.
            let maxInput =
                deflater == nil
                ? max(room, 0)
                : min(max(space - FrameHeader.byteCount - 2 - 256, 0), self.configuration.compressedFrameLimit)
            // Compressed frames may take a whole frame limit per turn: their wire size is a fraction of it.
            let count = min(
                stream.pendingBytes,
                stream.sendCredit.available,
                self.connectionSendCredit.available,
                deflater == nil ? self.configuration.quantum : self.configuration.compressedFrameLimit,
                maxInput
            )
            if count == 0 && stream.pendingBytes > 0 {
                if deflater != nil && self.connectionSendCredit.available > 0 {
                    // No room for a compressed frame in this record: the stream keeps its place at the front.
                    stream.scheduled = true
                    self.activeStreams.putBack(stream)
                    break
                }
                // Only the connection window can be short here (hasSendableWork checked the stream's own).
                stream.scheduled = true
                self.streamsAwaitingConnectionCredit.append(stream)
                continue
            }
            let fin = stream.localEndOfStream && count == stream.pendingBytes
            if let deflater, count > 0 {
                let written = self.writeCompressedFrame(count, of: stream, deflater: deflater, fin: fin, into: &buffer)
                space -= FrameHeader.byteCount + written
                lastStream = nil
            } else if extending {
                lastLength += count
                buffer.setInteger(UInt16(lastLength), at: lastLengthIndex)
                if fin { buffer.setInteger(FrameFlags.fin.rawValue, at: lastLengthIndex - 5) }
                space -= count
                lastStream = stream
            } else {
                lastLengthIndex = buffer.writeFrameHeader(
                    FrameHeader(type: .data, flags: fin ? .fin : [], streamID: stream.id, length: count)
                )
                lastLength = count
                space -= FrameHeader.byteCount + count
                lastStream = stream
            }
            if count > 0 {
                stream.bytesSent += count
                self.payloadBytesSent += count
                self.activeStreams.sent(count, by: stream)
                if deflater == nil { self.copyPending(count, of: stream, into: &buffer) }
                stream.sendCredit.spend(count)
                self.connectionSendCredit.spend(count)
                if stream.sendCredit.available == 0 { self.markCreditStalled(stream) }
            }
            if fin {
                lastStream = nil
                if stream.state == .halfClosedRemote {
                    self.markClosed(stream, reset: nil)
                } else {
                    stream.state = .halfClosedLocal
                }
                if stream.releaseWhenFinished { self.removeFromTable(stream) }
                continue
            }
            let limit = self.configuration.streamPendingLimit
            if stream.pendingBytes + count >= limit && stream.pendingBytes < limit {
                self.delegate?.multiplexer(self, streamWantsRead: stream)
            }
            self.schedule(stream)
        }
        if space > 0 { space = self.writeDatagrams(into: &buffer, budget: space) }
        if pendingBefore >= self.configuration.totalPendingLimit
            && self.sendablePendingBytes < self.configuration.totalPendingLimit
        {
            self.resumeBlockedReaders()
        }
        return buffer.writerIndex > start
    }

    /// Writes queued datagrams and IP packets that fit in `budget`; returns the budget left.
    /// The size of the next control frame or datagram in line (0 when none): frames that cannot be split,
    /// so a record must have room for them.
    public var nextUnsplittableFrameBytes: Int {
        let control = self.controlQueue.first?.encodedLength ?? 0
        return max(control, self.nextUnsplittableDatagramBytes)
    }

    /// The frame size of the next datagram, or (at least) of the next IP packet, 0 when none waits.
    private var nextUnsplittableDatagramBytes: Int {
        if let (_, payload) = self.datagramQueue.first { return FrameHeader.byteCount + payload.readableBytes }
        let packet = self.queuedPacketBytes > 0 ? self.packetQueue.largestQueuedBytes : 0
        return packet > 0 ? FrameHeader.byteCount + packet : 0
    }

    private func writeDatagrams(into buffer: inout ByteBuffer, budget: Int) -> Int {
        var budget = budget
        while let (id, payload) = self.datagramQueue.first {
            let size = FrameHeader.byteCount + payload.readableBytes
            guard size <= budget else { break }
            self.datagramQueue.removeFirst()
            self.datagramQueueBytes -= payload.readableBytes
            buffer.writeFrameHeader(FrameHeader(type: .datagram, streamID: id, length: payload.readableBytes))
            buffer.writeImmutableBuffer(payload)
            budget -= size
        }
        while self.queuedPacketBytes > 0,
            let packet = self.packetQueue.dequeue(
                maxBytes: budget - FrameHeader.byteCount,
                now: self.clock.uptimeNanoseconds
            )
        {
            buffer.writeFrameHeader(FrameHeader(type: .ipPacket, streamID: .connection, length: packet.readableBytes))
            buffer.writeImmutableBuffer(packet)
            budget -= FrameHeader.byteCount + packet.readableBytes
        }
        if !self.datagramReadersWaiting.isEmpty && self.datagramQueueBytes <= self.configuration.datagramReadLimit / 2 {
            while let stream = self.datagramReadersWaiting.popFirst() {
                // An entry whose stream a WINDOW_UPDATE woke meanwhile, or that now waits for credit, is left.
                guard stream.readBlocked, !self.datagramCreditShort(stream) else { continue }
                stream.readBlocked = false
                if !stream.released && stream.state.isOpen {
                    self.delegate?.multiplexer(self, streamWantsRead: stream)
                }
            }
        }
        return budget
    }

    /// The deflate context to use for the stream's next frame, deciding (once) whether the stream compresses.
    private func deflater(for stream: MuxStream) -> Deflater? {
        guard self.configuration.compression else { return nil }
        switch stream.compression {
        case .off:
            return nil
        case .active(let deflater, _, _):
            return deflater
        case .undecided:
            guard stream.kind == .tcp, let first = stream.pending.first, !CompressibilityHint.looksIncompressible(first)
            else {
                stream.compression = .off
                return nil
            }
            fallthrough
        case .idle:
            guard let deflater = Deflater() else {
                stream.compression = .off
                return nil
            }
            stream.compression = .active(deflater, fresh: true, lastUse: .now())
            self.compressingStreams[stream.id.rawValue] = stream
            return deflater
        }
    }

    /// Writes one compressed DATA frame (`u16 original length ‖ raw deflate`) of the next `count` pending bytes.
    /// Returns its payload size. Stops compressing a stream whose data does not shrink by 10%.
    private func writeCompressedFrame(
        _ count: Int,
        of stream: MuxStream,
        deflater: Deflater,
        fin: Bool,
        into buffer: inout ByteBuffer
    ) -> Int {
        guard case .active(_, let fresh, _) = stream.compression else { return 0 }
        var flags: FrameFlags = [.compressed]
        if fresh { flags.insert(.compressionStart) }
        if fin { flags.insert(.fin) }
        let lengthIndex = buffer.writeFrameHeader(
            FrameHeader(type: .data, flags: flags, streamID: stream.id, length: 0)
        )
        buffer.writeInteger(UInt16(count))
        let input = self.takePending(count, of: stream)
        let written = 2 + deflater.compress(input, into: &buffer)
        buffer.setInteger(UInt16(written), at: lengthIndex)
        stream.compression = .active(deflater, fresh: false, lastUse: .now())
        self.compressedInput += count
        self.compressedOutput += written
        stream.probeInput += count
        stream.probeOutput += written
        if stream.probeInput >= 32 << 10 {
            if stream.probeOutput * 10 > stream.probeInput * 9 {
                // Incompressible (media, TLS, random): send it as it is from now on, at no CPU cost.
                stream.compression = .off
                if stream.inflater == nil { self.compressingStreams.removeValue(forKey: stream.id.rawValue) }
            }
            stream.probeInput = 0
            stream.probeOutput = 0
        }
        return written
    }

    /// Removes the next `count` pending bytes as one buffer (a slice when they lie in one buffer).
    private func takePending(_ count: Int, of stream: MuxStream) -> ByteBuffer {
        let index = stream.pending.startIndex
        if stream.pending[index].readableBytes >= count {
            let slice = stream.pending[index].readSlice(length: count)!
            if stream.pending[index].readableBytes == 0 { stream.pending.removeFirst() }
            stream.pendingBytes -= count
            self.totalPendingBytes -= count
            return slice
        }
        var gathered = ByteBuffer()
        gathered.reserveCapacity(count)
        self.copyPending(count, of: stream, into: &gathered)
        return gathered
    }

    /// Moves `count` bytes from the front of the stream's pending buffers into the record.
    private func copyPending(_ count: Int, of stream: MuxStream, into buffer: inout ByteBuffer) {
        var remaining = count
        while remaining > 0 {
            let index = stream.pending.startIndex
            let available = stream.pending[index].readableBytes
            if available <= remaining {
                buffer.writeImmutableBuffer(stream.pending[index])
                stream.pending.removeFirst()
                remaining -= available
            } else {
                let slice = stream.pending[index].readSlice(length: remaining)!
                buffer.writeImmutableBuffer(slice)
                remaining = 0
            }
        }
        stream.pendingBytes -= count
        self.totalPendingBytes -= count
    }

    /// Appends a REKEY frame (the caller then seals the record and rekeys its sender).
    public func writeRekeyFrame(into buffer: inout ByteBuffer) {
        buffer.writeFrameHeader(FrameHeader(type: .rekey, streamID: .connection, length: 0))
    }

    /// Appends a RECEIVED frame: this side processed the peer's records 1 ... `count` (docs/PROTOCOL.md §7.1).
    public func writeReceivedFrame(count: UInt64, into buffer: inout ByteBuffer) {
        buffer.writeFrameHeader(FrameHeader(type: .received, streamID: .connection, length: 8))
        buffer.writeInteger(count)
    }

    /// Appends a CLOSE frame, the last frame this side ever sends.
    public func writeCloseFrame(code: ErrorCode, into buffer: inout ByteBuffer) {
        buffer.writeFrameHeader(FrameHeader(type: .close, streamID: .connection, length: 4))
        buffer.writeInteger(code.rawValue)
    }
}
