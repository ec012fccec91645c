import NIOCore
import Testing

@testable import TunnelProtocol

struct CodecTests {
    @Test func frameHeaderRoundTrips() throws {
        var buffer = ByteBuffer()
        let lengthIndex = buffer.writeFrameHeader(
            FrameHeader(type: .windowUpdate, flags: [.fin, .ack], streamID: StreamID(0xDEAD_BEEF), length: 4)
        )
        #expect(lengthIndex == 6)
        buffer.writeInteger(UInt32(7))
        #expect(Array(buffer.readableBytesView.prefix(8)) == [0x03, 0x03, 0xDE, 0xAD, 0xBE, 0xEF, 0x00, 0x04])
        let frame = try #require(try buffer.readFrame())
        let (header, payload) = (frame.header, frame.payload)
        #expect(
            header == FrameHeader(type: .windowUpdate, flags: [.fin, .ack], streamID: StreamID(0xDEAD_BEEF), length: 4)
        )
        #expect(payload.readableBytes == 4)
        #expect(try buffer.readFrame() == nil)
    }

    @Test(arguments: [[UInt8]([0x00]), [0x00, 0x00, 0, 0, 0, 1, 0], [0x00, 0x00, 0, 0, 0, 1, 0, 5, 1, 2]])
    func truncatedFramesInARecordAreErrors(bytes: [UInt8]) {
        var buffer = ByteBuffer(bytes: bytes)
        #expect(throws: ProtocolError.self) { _ = try buffer.readFrame() }
    }

    @Test(arguments: [
        TargetAddress(host: .ipv4(0x0A00_0001), port: 80),
        TargetAddress(host: .ipv6([0x20, 0x01, 0x0d, 0xb8] + Array(repeating: 0, count: 11) + [1]), port: 443),
        TargetAddress(host: .domain("example.com"), port: 8080),
        TargetAddress(host: .domain(String(repeating: "a", count: 255)), port: 1),
    ])
    func targetAddressRoundTrips(address: TargetAddress) throws {
        var buffer = ByteBuffer()
        let written = buffer.writeTargetAddress(address)
        #expect(written == address.encodedLength)
        // Every strict prefix needs more bytes and leaves the reader index where it was.
        for cut in 0..<written {
            var partial = buffer.getSlice(at: 0, length: cut)!
            #expect(try partial.readTargetAddress() == nil)
            #expect(partial.readerIndex == 0)
        }
        #expect(try buffer.readTargetAddress() == address)
        #expect(buffer.readableBytes == 0)
    }

    @Test func badAddressTypesAndEmptyNamesThrow() {
        var bad = ByteBuffer(bytes: [0x02, 1, 2, 3, 4, 0, 80])
        #expect(throws: TargetAddressError.unsupportedAddressType(2)) { _ = try bad.readTargetAddress() }
        var empty = ByteBuffer(bytes: [0x03, 0, 0, 80])
        #expect(throws: TargetAddressError.invalidDomain) { _ = try empty.readTargetAddress() }
        var nul = ByteBuffer(bytes: [0x03, 2, 0x61, 0x00, 0, 80])
        #expect(throws: TargetAddressError.invalidDomain) { _ = try nul.readTargetAddress() }
    }

    @Test func ipv6FormattingFollowsRFC5952() {
        func text(_ groups: [UInt16]) -> String {
            TargetAddress.formatIPv6(groups.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xFF)] })
        }
        #expect(text([0, 0, 0, 0, 0, 0, 0, 1]) == "::1")
        #expect(text([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]) == "2001:db8::1")
        #expect(text([0x2001, 0xdb8, 0, 1, 0, 0, 0, 1]) == "2001:db8:0:1::1")
        #expect(text([1, 2, 3, 4, 5, 6, 7, 8]) == "1:2:3:4:5:6:7:8")
        #expect(text([0, 0, 0, 0, 0, 0, 0, 0]) == "::")
        #expect(text([1, 0, 2, 3, 4, 5, 6, 7]) == "1:0:2:3:4:5:6:7")
    }

    @Test func sessionParametersRoundTripAndSkipUnknownTags() throws {
        var parameters = SessionParameters()
        parameters.features = [.compression]
        parameters.maxConcurrentStreams = 77
        parameters.connectionWindow = 1 << 22
        var buffer = ByteBuffer()
        parameters.encode(into: &buffer)
        buffer.writeBytes([0x7F, 0x00, 0x03, 1, 2, 3])  // a future TLV
        #expect(try SessionParameters.decode(&buffer) == parameters)
        var empty = ByteBuffer()
        #expect(try SessionParameters.decode(&empty) == SessionParameters())
    }

    @Test(arguments: [
        [UInt8]([0x03, 0x00, 0x02, 0, 1]), [0x05, 0x00, 0x04, 0, 0, 0, 1], [0x01, 0x00], [0x02, 0x00, 0x09, 1],
    ])
    func malformedParametersAreRejected(bytes: [UInt8]) {
        var buffer = ByteBuffer(bytes: bytes)
        #expect(throws: ProtocolError.self) { _ = try SessionParameters.decode(&buffer) }
    }

    @Test func recordFramingValidatesLength() throws {
        #expect(try RecordFraming.nextLength(in: ByteBuffer(bytes: [0x00])) == nil)
        #expect(try RecordFraming.nextLength(in: ByteBuffer(bytes: [0x01, 0x00])) == 256)
        #expect(throws: ProtocolError.self) { _ = try RecordFraming.nextLength(in: ByteBuffer(bytes: [0x00, 0x0F])) }
    }

    @Test func sendCreditRejectsZeroAndOverflow() throws {
        var credit = SendCredit(100)
        credit.spend(40)
        #expect(credit.available == 60)
        try credit.grant(40)
        #expect(credit.available == 100)
        #expect(throws: ProtocolError.self) { try credit.grant(0) }
        #expect(throws: ProtocolError.self) { try credit.grant(UInt32(Int32.max)) }
    }

    @Test func receiveWindowKeepsItsInvariantAndReleases() throws {
        var window = ReceiveWindow(target: 1000)
        try window.received(600)
        #expect(window.consumed(400, now: .now(), roundTrip: nil) == nil)
        #expect(window.consumed(100, now: .now(), roundTrip: nil) == 500)
        #expect(window.available + window.buffered + window.consumedUnacknowledged == 1000)
        #expect(throws: ProtocolError.self) { try window.received(1000) }
        #expect(window.releaseAll() == 100)
    }
}
