import NIOCore
import Testing

@testable import TunnelProtocol

/// Records datagrams delivered to a UDP association's endpoint.
final class DatagramSink: MuxStreamContext {
    var datagrams: [[UInt8]] = []
    func deliver(_ data: ByteBuffer) {}
    func peerFinished() {}
    func streamClosed(reset: ErrorCode?) {}
    func readIfWanted() {}
    func deliverDatagram(_ payload: ByteBuffer) { self.datagrams.append(Array(payload.readableBytesView)) }
}

struct DatagramTests {
    func openAssociation(_ pair: MuxPair) throws -> (MuxStream, MuxStream) {
        let c = try #require(pair.client.openStream(to: .unspecified, kind: .udp))
        try pair.pump()
        let s = try #require(pair.server.stream(c.id))
        #expect(s.kind == .udp)
        pair.server.completeOpen(s, reply: .succeeded, bound: .unspecified)
        try pair.pump()
        #expect(c.state == .open)
        return (c, s)
    }

    @Test func datagramsTravelBothWays() throws {
        let pair = MuxPair()
        let (c, s) = try self.openAssociation(pair)
        let clientSink = DatagramSink()
        let serverSink = DatagramSink()
        c.context = clientSink
        s.context = serverSink
        #expect(pair.client.sendDatagram(ByteBuffer(bytes: [1, 2, 3]), on: c))
        #expect(pair.server.sendDatagram(ByteBuffer(bytes: [4, 5]), on: s))
        try pair.pump()
        #expect(serverSink.datagrams == [[1, 2, 3]])
        #expect(clientSink.datagrams == [[4, 5]])
    }

    @Test func aFullQueueDropsAndCounts() throws {
        var config = Multiplexer.Configuration()
        config.maxQueuedDatagramBytes = 10_000
        let pair = MuxPair(client: config, server: config)
        let (c, _) = try self.openAssociation(pair)
        var accepted = 0
        for _ in 0..<20 where pair.client.sendDatagram(ByteBuffer(repeating: 7, count: 1000), on: c) { accepted += 1 }
        #expect(accepted == 10)
        #expect(pair.client.droppedDatagrams == 10)
    }

    @Test func datagramsOnlyOnOpenUDPAssociations() throws {
        let pair = MuxPair()
        let (tcp, _) = try pair.openAccepted()
        #expect(!pair.client.sendDatagram(ByteBuffer(bytes: [1]), on: tcp))
        let pending = try #require(pair.client.openStream(to: .unspecified, kind: .udp))
        #expect(!pair.client.sendDatagram(ByteBuffer(bytes: [1]), on: pending), "not before OPEN_RESULT")
    }

    @Test func datagramsGetAtMostHalfARecordWhileStreamsHaveData() throws {
        let pair = MuxPair()
        let (c, _) = try self.openAssociation(pair)
        let (stream, _) = try pair.openAccepted()
        for _ in 0..<100 { pair.client.sendDatagram(ByteBuffer(repeating: 1, count: 1000), on: c) }
        pair.client.localRead(bytes(200_000), on: stream)
        var record = ByteBuffer()
        #expect(pair.client.produceRecord(into: &record, limit: WireLimits.maxRecordPlaintext, now: pair.now))
        var datagramBytes = 0
        var dataBytes = 0
        while let frame = try record.readFrame() {
            let (header, payload) = (frame.header, frame.payload)
            if header.type == .datagram { datagramBytes += payload.readableBytes }
            if header.type == .data { dataBytes += payload.readableBytes }
        }
        #expect(datagramBytes <= WireLimits.maxRecordPlaintext / 2)
        #expect(dataBytes >= WireLimits.maxRecordPlaintext / 2 - 2000)
    }

    @Test func datagramsFillRecordsWhenNoStreamHasData() throws {
        let pair = MuxPair()
        let (c, _) = try self.openAssociation(pair)
        for _ in 0..<100 { pair.client.sendDatagram(ByteBuffer(repeating: 1, count: 1000), on: c) }
        var record = ByteBuffer()
        #expect(pair.client.produceRecord(into: &record, limit: WireLimits.maxRecordPlaintext, now: pair.now))
        #expect(record.readableBytes > WireLimits.maxRecordPlaintext - 1100)
    }

    @Test func aDatagramLargerThanHalfARecordStillGoesOut() throws {
        let pair = MuxPair()
        let (c, _) = try self.openAssociation(pair)
        let (stream, _) = try pair.openAccepted()
        pair.client.localRead(bytes(500_000), on: stream)
        #expect(pair.client.sendDatagram(ByteBuffer(repeating: 9, count: 50_000), on: c))
        var record = ByteBuffer()
        #expect(pair.client.produceRecord(into: &record, limit: WireLimits.maxRecordPlaintext, now: pair.now))
        var sawDatagram = false
        while let header = try record.readFrame()?.header {
            if header.type == .datagram { sawDatagram = true }
        }
        #expect(sawDatagram)
    }

    // MARK: - Datagrams within bounds (issue 17, item 3)

    func creditPair() -> MuxPair {
        var config = Multiplexer.Configuration()
        config.datagramCredit = true
        return MuxPair(client: config, server: config)
    }

    @Test func withCreditASenderStopsAtTheWindowAndReadsAgainOnceTheReceiverHandledThem() throws {
        let pair = self.creditPair()
        let (c, s) = try self.openAssociation(pair)
        let sink = DatagramSink()
        s.context = sink
        #expect(c.availableSendCredit == 128 << 10, "a UDP association starts with the small datagram window")
        var accepted = 0
        for _ in 0..<200 where pair.client.sendDatagram(ByteBuffer(repeating: 7, count: 1000), on: c) { accepted += 1 }
        #expect(accepted == (128 << 10) / 1000)
        #expect(pair.client.droppedDatagrams == 200 - accepted)
        #expect(!pair.client.shouldReadDatagrams(for: c), "no credit: the socket stops reading")
        _ = pair.clientEvents.take()
        try pair.pump()
        #expect(sink.datagrams.count == accepted, "everything within the window arrived")
        #expect(pair.clientEvents.take().contains(.wantsRead(c.id)), "the credit that came back wakes the reader")
        #expect(pair.client.shouldReadDatagrams(for: c))
        // Credit returns in halves of the window, once the receiver handed that much on.
        #expect(c.availableSendCredit == (128 << 10) - accepted * 1000 + 66 * 1000)
    }

    @Test func withoutCreditNegotiatedDatagramsSpendNoWindow() throws {
        let pair = MuxPair()
        let (c, _) = try self.openAssociation(pair)
        var accepted = 0
        for _ in 0..<200 where pair.client.sendDatagram(ByteBuffer(repeating: 7, count: 1000), on: c) { accepted += 1 }
        #expect(accepted == 200)
        #expect(c.availableSendCredit == 1 << 20, "an older peer's window field is left alone")
    }

    @Test func aFullDatagramQueueStopsTheReadsUntilItHasDrainedToHalf() throws {
        var config = Multiplexer.Configuration()
        config.datagramReadLimit = 8000
        let pair = MuxPair(client: config, server: config)
        let (c, _) = try self.openAssociation(pair)
        for _ in 0..<7 { pair.client.sendDatagram(ByteBuffer(repeating: 7, count: 1000), on: c) }
        #expect(pair.client.shouldReadDatagrams(for: c))
        pair.client.sendDatagram(ByteBuffer(repeating: 7, count: 1000), on: c)
        #expect(!pair.client.shouldReadDatagrams(for: c))
        #expect(!pair.client.shouldReadDatagrams(for: c), "asking twice queues it once")
        _ = pair.clientEvents.take()
        var record = ByteBuffer()
        #expect(pair.client.produceRecord(into: &record, limit: 3000, now: pair.now))
        #expect(pair.clientEvents.take().isEmpty, "still above half of the limit")
        #expect(pair.client.produceRecord(into: &record, limit: 10_000, now: pair.now))
        #expect(pair.clientEvents.take() == [.wantsRead(c.id)])
        #expect(pair.client.shouldReadDatagrams(for: c))
    }

    @Test func datagramOnATCPStreamIsAProtocolError() throws {
        let pair = MuxPair()
        let (c, _) = try pair.openAccepted()
        var record = ByteBuffer()
        record.writeFrameHeader(FrameHeader(type: .datagram, streamID: c.id, length: 1))
        record.writeInteger(UInt8(0))
        #expect(throws: ProtocolError.self) { _ = try pair.server.receivedRecord(&record, now: pair.now) }
    }

    @Test func lateDatagramsForEndedAssociationsAreIgnored() throws {
        let pair = MuxPair()
        let (c, s) = try self.openAssociation(pair)
        pair.server.sendDatagram(ByteBuffer(bytes: [1]), on: s)
        pair.client.release(c)
        try pair.pump()
        #expect(pair.client.streamCount == 0)
    }

    // MARK: - Sizes across the whole range (issue 14, item 1)

    /// Every size a UDP datagram can have, at both ends, beside a busy stream: what fits one record is
    /// delivered intact, anything larger is refused and counted, and nothing is ever left queued (a stuck head
    /// would hold back every frame behind it, the peer's answers included).
    @Test(arguments: [Multiplexer.Role.client, .server])
    func datagramsOfEverySizeEitherGoOutWholeOrAreCountedAsDropped(sender role: Multiplexer.Role) throws {
        let pair = MuxPair()
        let (c, s) = try self.openAssociation(pair)
        let (clientStream, serverStream) = try pair.openAccepted()
        let (mux, association, stream) =
            role == .client ? (pair.client, c, clientStream) : (pair.server, s, serverStream)
        let sink = DatagramSink()
        (role == .client ? s : c).context = sink
        var sizes = Array(stride(from: 0, through: 65_000, by: 997))
        sizes += Array((WireLimits.maxUnsplitFramePayload - 16)...65_535)
        var expectedDrops = 0
        var expectedDelivered: [Int] = []
        for size in sizes {
            // A stream with data at the same time, so datagrams share records with DATA frames.
            mux.localRead(bytes(3000), on: stream)
            let accepted = mux.sendDatagram(
                ByteBuffer(repeating: UInt8(truncatingIfNeeded: size), count: size),
                on: association
            )
            #expect(accepted == (size <= WireLimits.maxUnsplitFramePayload), "size \(size)")
            if accepted { expectedDelivered.append(size) } else { expectedDrops += 1 }
            try pair.pump()
            #expect(!mux.hasOutput, "size \(size) left output queued")
        }
        #expect(mux.droppedDatagrams == expectedDrops)
        #expect(sink.datagrams.map(\.count) == expectedDelivered)
        #expect(
            zip(sink.datagrams, expectedDelivered).allSatisfy { d, n in
                d.allSatisfy { $0 == UInt8(truncatingIfNeeded: n) }
            }
        )
    }

    @Test func theLargestDatagramFitsARecordThatEndsWithARekey() throws {
        let pair = MuxPair()
        let (c, _) = try self.openAssociation(pair)
        #expect(pair.client.sendDatagram(ByteBuffer(repeating: 1, count: WireLimits.maxUnsplitFramePayload), on: c))
        var record = ByteBuffer()
        #expect(pair.client.produceRecord(into: &record, limit: WireLimits.maxRecordFrameBytes, now: pair.now))
        pair.client.writeRekeyFrame(into: &record)
        #expect(record.readableBytes == WireLimits.maxRecordPlaintext)
        #expect(!pair.client.hasOutput)
    }

    @Test func everyNewPieceOfOutputAsksForAFlush() throws {
        let pair = MuxPair()
        let (c, _) = try self.openAssociation(pair)
        let (stream, _) = try pair.openAccepted()
        let before = pair.clientEvents.outputSignals
        pair.client.sendDatagram(ByteBuffer(repeating: 1, count: 100), on: c)
        pair.client.sendDatagram(ByteBuffer(repeating: 1, count: 100), on: c)
        pair.client.sendPing(now: pair.now)
        pair.client.localRead(bytes(10), on: stream)
        #expect(pair.clientEvents.outputSignals - before == 4, "output already queued must not silence new output")
    }
}
