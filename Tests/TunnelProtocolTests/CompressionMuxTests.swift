import NIOCore
import Testing
import TunnelCompression
import TunnelTestSupport

@testable import TunnelProtocol

struct CompressionMuxTests {
    func compressedPair() -> MuxPair {
        var config = Multiplexer.Configuration()
        config.compression = true
        return MuxPair(client: config, server: config)
    }

    @Test func textIsCompressedAndArrivesIntact() throws {
        let pair = self.compressedPair()
        let (_, s) = try pair.openAccepted()
        let data = TestData.compressibleText(300_000)
        pair.server.localRead(data, on: s)
        var wire = 0
        for var record in MuxPair.produce(pair.server) {
            wire += record.readableBytes
            _ = try pair.client.receivedRecord(&record, now: pair.now)
        }
        #expect(pair.clientEvents.delivered[1] == Array(data.readableBytesView))
        #expect(wire < 300_000 / 4)
        #expect(pair.server.compressedInput == 300_000)
    }

    @Test func randomDataStopsBeingCompressed() throws {
        let pair = self.compressedPair()
        let (_, s) = try pair.openAccepted()
        let data = TestData.random(200_000)
        pair.server.localRead(data, on: s)
        try pair.pump()
        #expect(pair.clientEvents.delivered[1] == Array(data.readableBytesView))
        #expect(pair.server.compressedInput <= 64 << 10, "switched off after the first probe")
        guard case .off = s.compression else {
            Issue.record("still compressing")
            return
        }
    }

    @Test func tlsStreamsAreNeverCompressed() throws {
        let pair = self.compressedPair()
        let (_, s) = try pair.openAccepted()
        pair.server.localRead(ByteBuffer(bytes: [0x16, 0x03, 0x03] + Array(repeating: 0, count: 5000)), on: s)
        try pair.pump()
        #expect(pair.server.compressedInput == 0)
    }

    @Test func idleContextsAreFreedAndRestartCleanly() throws {
        let pair = self.compressedPair()
        let (_, s) = try pair.openAccepted()
        pair.server.localRead(TestData.compressibleText(10_000), on: s)
        try pair.pump()
        #expect(pair.server.streamsWithCompressionContexts == 1)
        pair.server.releaseIdleCompressionContexts(now: .now() + .seconds(31))
        pair.client.releaseIdleCompressionContexts(now: .now() + .seconds(61))
        #expect(pair.server.streamsWithCompressionContexts == 0)
        #expect(pair.client.streamsWithCompressionContexts == 0)
        pair.server.localRead(TestData.compressibleText(10_000), on: s)
        try pair.pump()
        #expect(pair.clientEvents.delivered[1]?.count == 20_000)
    }

    func compressedFrame(stream: StreamID, declared: UInt16, body: ByteBuffer, start: Bool = true) -> ByteBuffer {
        var record = ByteBuffer()
        var flags: FrameFlags = [.compressed]
        if start { flags.insert(.compressionStart) }
        record.writeFrameHeader(
            FrameHeader(type: .data, flags: flags, streamID: stream, length: 2 + body.readableBytes)
        )
        record.writeInteger(declared)
        record.writeImmutableBuffer(body)
        return record
    }

    @Test func framesThatDoNotInflateToTheirDeclaredSizeEndTheConnection() throws {
        let pair = self.compressedPair()
        let (c, _) = try pair.openAccepted()
        let deflater = try #require(Deflater())
        var bomb = ByteBuffer()
        var zeros = ByteBuffer()
        zeros.writeRepeatingByte(0, count: 1 << 20)
        _ = deflater.compress(zeros, into: &bomb)
        var record = self.compressedFrame(stream: c.id, declared: 16384, body: bomb)
        #expect(throws: ProtocolError.self) { _ = try pair.client.receivedRecord(&record, now: pair.now) }
        var short = ByteBuffer()
        _ = try #require(Deflater()).compress(TestData.compressibleText(100), into: &short)
        var lying = self.compressedFrame(stream: c.id, declared: 200, body: short)
        #expect(throws: ProtocolError.self) { _ = try pair.client.receivedRecord(&lying, now: pair.now) }
    }

    @Test func compressedFramesNeedNegotiationAndAStartedContext() throws {
        let plain = MuxPair()
        let (c, _) = try plain.openAccepted()
        var body = ByteBuffer()
        _ = try #require(Deflater()).compress(TestData.compressibleText(100), into: &body)
        var record = self.compressedFrame(stream: c.id, declared: 100, body: body)
        #expect(throws: ProtocolError.self) { _ = try plain.client.receivedRecord(&record, now: plain.now) }
        let pair = self.compressedPair()
        let (c2, _) = try pair.openAccepted()
        var noStart = self.compressedFrame(stream: c2.id, declared: 100, body: body, start: false)
        #expect(throws: ProtocolError.self) { _ = try pair.client.receivedRecord(&noStart, now: pair.now) }
    }

    @Test func compressedFramesForClosedStreamsAreAccountedByDeclaredLength() throws {
        var config = Multiplexer.Configuration()
        config.compression = true
        config.connectionWindow = 1 << 20
        let pair = MuxPair(client: config, server: config)
        let (c, s) = try pair.openAccepted()
        pair.server.localRead(TestData.compressibleText(200_000), on: s)
        pair.client.resetStream(c, code: .cancel)
        pair.client.release(c)
        for var record in MuxPair.produce(pair.server) { _ = try pair.client.receivedRecord(&record, now: pair.now) }
        #expect(pair.client.connectionReceiveWindow.buffered == 0)
    }
}
