import NIOCore
import Testing

@testable import TunnelProtocol

/// IP_PACKET and CONTROL frames (full-tunnel mode, PROTOCOL.md §5).
struct FullTunnelMuxTests {
    static var fullTunnel: Multiplexer.Configuration {
        var config = Multiplexer.Configuration()
        config.fullTunnel = true
        return config
    }

    func packet(_ size: Int, tag: UInt8) -> ByteBuffer {
        var buffer = ByteBuffer(repeating: tag, count: size)
        buffer.setInteger(UInt8(0x45), at: 0)
        return buffer
    }

    @Test func packetsTravelBothWaysWhole() throws {
        let pair = MuxPair(client: Self.fullTunnel, server: Self.fullTunnel)
        #expect(pair.client.sendIPPacket(self.packet(1420, tag: 1)))
        #expect(pair.client.sendIPPacket(self.packet(60, tag: 2)))
        #expect(pair.server.sendIPPacket(self.packet(1000, tag: 3)))
        try pair.pump()
        #expect(
            pair.serverEvents.packets == [
                Array(self.packet(1420, tag: 1).readableBytesView), Array(self.packet(60, tag: 2).readableBytesView),
            ]
        )
        #expect(pair.clientEvents.packets == [Array(self.packet(1000, tag: 3).readableBytesView)])
    }

    @Test func packetsAreIPPacketFramesOnStreamZero() throws {
        let pair = MuxPair(client: Self.fullTunnel, server: Self.fullTunnel)
        pair.client.sendIPPacket(self.packet(100, tag: 9))
        var record = try #require(MuxPair.produce(pair.client).first)
        let frame = try #require(try record.readFrame())
        let (header, payload) = (frame.header, frame.payload)
        #expect(header.type == .ipPacket)
        #expect(header.streamID == .connection)
        #expect(payload.readableBytes == 100)
    }

    @Test func withoutNegotiationPacketsAreRefusedAndIgnored() throws {
        let pair = MuxPair(client: Self.fullTunnel, server: Multiplexer.Configuration())
        #expect(!pair.server.sendIPPacket(self.packet(100, tag: 1)))
        // A client that sends them anyway is ignored, not obeyed.
        #expect(pair.client.sendIPPacket(self.packet(100, tag: 1)))
        try pair.pump()
        #expect(pair.serverEvents.packets.isEmpty)
    }

    @Test func aFullQueueDropsAndCounts() throws {
        var config = Self.fullTunnel
        config.maxQueuedPackets = 8
        let pair = MuxPair(client: config, server: config)
        for _ in 0..<20 { pair.client.sendIPPacket(self.packet(1400, tag: 1)) }
        #expect(pair.client.queuedPackets == 8)
        #expect(pair.client.droppedPackets == 12)
        try pair.pump()
        #expect(pair.serverEvents.packets.count == 8)
        // Sending freed the queue.
        #expect(pair.client.sendIPPacket(self.packet(1400, tag: 1)))
    }

    @Test func emptyAndOversizedPacketsAreRefused() {
        let pair = MuxPair(client: Self.fullTunnel, server: Self.fullTunnel)
        #expect(!pair.client.sendIPPacket(ByteBuffer()))
        #expect(pair.client.droppedPackets == 0, "an empty read is not a packet")
        #expect(!pair.client.sendIPPacket(ByteBuffer(repeating: 0x45, count: WireLimits.maxUnsplitFramePayload + 1)))
        #expect(pair.client.droppedPackets == 1, "a packet that cannot fit one record is dropped and counted")
        #expect(pair.client.sendIPPacket(ByteBuffer(repeating: 0x45, count: WireLimits.maxUnsplitFramePayload)))
    }

    @Test func packetsAndStreamsShareRecordsFairly() throws {
        let pair = MuxPair(client: Self.fullTunnel, server: Self.fullTunnel)
        let (c, _) = try pair.openAccepted()
        pair.client.localRead(bytes(1 << 20), on: c)
        for _ in 0..<300 { pair.client.sendIPPacket(self.packet(1400, tag: 5)) }
        // Every record carries both kinds: neither bulk stream data nor packets starve the other.
        for _ in 0..<4 {
            var buffer = ByteBuffer()
            #expect(pair.client.produceRecord(into: &buffer, limit: WireLimits.maxRecordPlaintext, now: pair.now))
            var types: Set<UInt8> = []
            while let header = try buffer.readFrame()?.header { types.insert(header.type.rawValue) }
            #expect(types == [FrameType.data.rawValue, FrameType.ipPacket.rawValue])
        }
    }

    @Test func aPingBesideAFullQueueOfDownloadPacketsGoesOutFirstAndIsNotTheOneDropped() throws {
        var config = Self.fullTunnel
        config.maxQueuedPackets = 64
        let pair = MuxPair(client: config, server: config)
        for _ in 0..<100 { pair.server.sendIPPacket(ipv4Packet(sourcePort: 443, destinationPort: 40000)) }
        #expect(pair.server.droppedPackets == 36, "the queue holds 64")
        // The download has been sending for a while.
        var record = ByteBuffer()
        #expect(pair.server.produceRecord(into: &record, limit: 4 * 1420, now: pair.now))
        for _ in 0..<10 { pair.server.sendIPPacket(ipv4Packet(sourcePort: 443, destinationPort: 40000)) }
        let dropped = pair.server.droppedPackets
        pair.server.sendIPPacket(ipv4Packet(size: 84, sourcePort: 0, destinationPort: 0, proto: 1))
        #expect(pair.server.droppedPackets == dropped + 1, "a download packet made room")
        record.clear()
        #expect(pair.server.produceRecord(into: &record, limit: 4 * 1420, now: pair.now))
        var sizes: [Int] = []
        while let frame = try record.readFrame() { sizes.append(frame.payload.readableBytes) }
        #expect(sizes.prefix(2).contains(84), "the ping is in the next record, not behind 64 packets: \(sizes)")
    }

    @Test func packetOnAStreamIsAProtocolError() throws {
        let pair = MuxPair(client: Self.fullTunnel, server: Self.fullTunnel)
        var record = ByteBuffer()
        record.writeFrameHeader(FrameHeader(type: .ipPacket, streamID: StreamID(1), length: 20))
        record.writeRepeatingByte(0x45, count: 20)
        #expect(throws: ProtocolError.self) { _ = try pair.server.receivedRecord(&record, now: pair.now) }
    }

    @Test func controlFramesReachTheDelegate() throws {
        let pair = MuxPair(client: Self.fullTunnel, server: Self.fullTunnel)
        pair.server.sendControl(ByteBuffer(bytes: [0x12, 0, 2, 0x05, 0x8C]))
        try pair.pump()
        #expect(pair.clientEvents.controls == [[0x12, 0, 2, 0x05, 0x8C]])

        var record = ByteBuffer()
        record.writeFrameHeader(FrameHeader(type: .control, streamID: StreamID(2), length: 0))
        #expect(throws: ProtocolError.self) { _ = try pair.client.receivedRecord(&record, now: pair.now) }
    }
}

struct TunnelAssignmentTests {
    let full = TunnelAssignment(
        ipv4: .init(address: IPAddress.parse("10.77.0.2")!, prefixLength: 24),
        ipv6: .init(address: IPAddress.parse("fd12:3456:789a:77::2")!, prefixLength: 64),
        mtu: 1420,
        dnsServers: [IPAddress.parse("10.77.0.1")!, IPAddress.parse("fd12:3456:789a:77::1")!]
    )

    func encoded(_ assignment: TunnelAssignment) -> ByteBuffer {
        var buffer = ByteBuffer()
        assignment.encode(into: &buffer)
        return buffer
    }

    @Test func roundTrips() throws {
        #expect(try TunnelAssignment.decode(self.encoded(self.full)) == self.full)
        let minimal = TunnelAssignment(
            ipv4: .init(address: IPAddress.parse("192.168.5.9")!, prefixLength: 16),
            mtu: 1280
        )
        #expect(try TunnelAssignment.decode(self.encoded(minimal)) == minimal)
    }

    @Test func unknownFieldsAreSkipped() throws {
        var buffer = ByteBuffer(bytes: [0x7F, 0, 3, 1, 2, 3])
        buffer.writeImmutableBuffer(self.encoded(self.full))
        #expect(try TunnelAssignment.decode(buffer) == self.full)
    }

    @Test(arguments: [
        ("no IPv4 address", [0x12, 0, 2, 0x05, 0x8C] as [UInt8]),
        ("truncated field", [0x10, 0, 5, 10, 0, 0]),
        ("IPv4 field of the wrong size", [0x10, 0, 4, 10, 0, 0, 2]),
        ("prefix too long", [0x10, 0, 5, 10, 0, 0, 2, 31]),
        ("prefix zero", [0x10, 0, 5, 10, 0, 0, 2, 0]),
        ("MTU too small", [0x10, 0, 5, 10, 0, 0, 2, 24, 0x12, 0, 2, 0x02, 0x00]),
        ("MTU field of the wrong size", [0x10, 0, 5, 10, 0, 0, 2, 24, 0x12, 0, 1, 0x05]),
        ("DNS address of the wrong size", [0x10, 0, 5, 10, 0, 0, 2, 24, 0x13, 0, 3, 1, 1, 1]),
    ])
    func malformedAssignmentsAreRejected(_ why: String, _ bytes: [UInt8]) {
        #expect(throws: ProtocolError.self, "\(why)") { try TunnelAssignment.decode(ByteBuffer(bytes: bytes)) }
    }

    @Test func atMostFourDNSServers() {
        var buffer = self.encoded(TunnelAssignment(ipv4: self.full.ipv4))
        for i in 0..<5 { buffer.writeBytes([0x13, 0, 4, 10, 0, 0, UInt8(i)]) }
        #expect(throws: ProtocolError.self) { try TunnelAssignment.decode(buffer) }
    }
}
