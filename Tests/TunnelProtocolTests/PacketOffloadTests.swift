import NIOCore
import Testing

@testable import TunnelProtocol

/// Offload headers on IP packets (docs/PROTOCOL.md §5.1): the header itself, and how the multiplexer sends,
/// strips and checks it.
struct PacketOffloadTests {
    /// A TCP segment to cut into 1448-byte segments, its checksum to complete (what Linux hands a TUN device
    /// with offload on).
    static let segment4 = PacketOffloadHeader(
        flags: PacketOffloadHeader.needsChecksum,
        gsoType: PacketOffloadHeader.gsoTCPv4,
        headerLength: 52,
        gsoSize: 1448,
        checksumStart: 20,
        checksumOffset: 16
    )

    /// A device packet: `header`, then an IP packet of `size` bytes (version `version`) filled with `tag`.
    static func devicePacket(_ header: PacketOffloadHeader, size: Int, version: UInt8 = 4, tag: UInt8 = 7) -> ByteBuffer
    {
        var buffer = ByteBuffer()
        header.write(to: &buffer)
        var ip = ByteBuffer(repeating: tag, count: size)
        ip.setInteger(version << 4 | 5, at: 0)
        buffer.writeBuffer(&ip)
        return buffer
    }

    static var offload: Multiplexer.Configuration {
        var config = FullTunnelMuxTests.fullTunnel
        config.packetOffload = true
        return config
    }

    @Test func theHeaderIsTheLittleEndianVirtioLayout() throws {
        var buffer = ByteBuffer()
        Self.segment4.write(to: &buffer)
        #expect(Array(buffer.readableBytesView) == [1, 1, 52, 0, 0xA8, 0x05, 20, 0, 16, 0])
        #expect(PacketOffloadHeader(from: buffer) == Self.segment4)
        #expect(PacketOffloadHeader(from: ByteBuffer(bytes: [1, 1, 52, 0, 0xA8, 0x05, 20, 0, 16])) == nil, "9 bytes")
        #expect(PacketOffloadHeader.plain.isPlain)
        #expect(!Self.segment4.isPlain)
        var checksumOnly = PacketOffloadHeader.plain
        checksumOnly.flags = PacketOffloadHeader.needsChecksum
        #expect(!checksumOnly.isPlain, "a peer without offload would get a wrong checksum")
        var valid = PacketOffloadHeader.plain
        valid.flags = PacketOffloadHeader.dataValid
        #expect(valid.isPlain)
    }

    @Test func onlyHeadersTheKernelShouldSeeAreAccepted() {
        #expect(Self.segment4.isAcceptable(ipVersion: 4, packetLength: 64000))
        #expect(PacketOffloadHeader.plain.isAcceptable(ipVersion: 6, packetLength: 40))
        var header = Self.segment4
        #expect(!header.isAcceptable(ipVersion: 6, packetLength: 64000), "TCPv4 segmentation of an IPv6 packet")
        header.gsoType = PacketOffloadHeader.gsoTCPv6
        #expect(header.isAcceptable(ipVersion: 6, packetLength: 64000))
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 64000))
        header.gsoType = PacketOffloadHeader.gsoTCPv4 | PacketOffloadHeader.gsoECN
        #expect(header.isAcceptable(ipVersion: 4, packetLength: 64000))
        header.gsoType = PacketOffloadHeader.gsoECN
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 64000), "ECN without segmentation")
        header.gsoType = 3  // UDP fragmentation offload
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 64000))
        header.gsoType = 5  // UDP segmentation: not enabled on our devices
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 64000))
        header = Self.segment4
        header.gsoSize = 0
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 64000), "segmenting into 0-byte segments")
        header = Self.segment4
        header.flags = 0
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 64000), "segmenting without a checksum to fill in")
        header = Self.segment4
        header.flags |= 4
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 64000), "an unknown flag")
        header = Self.segment4
        #expect(!header.isAcceptable(ipVersion: 4, packetLength: 37), "the checksum field past the packet's end")
        #expect(header.isAcceptable(ipVersion: 4, packetLength: 38))
    }

    @Test func withOffloadDevicePacketsCrossWholeHeaderAndAll() throws {
        let pair = MuxPair(client: Self.offload, server: Self.offload)
        let segment = Self.devicePacket(Self.segment4, size: 60000)
        #expect(pair.client.sendDevicePacket(segment))
        #expect(pair.server.sendDevicePacket(Self.devicePacket(.plain, size: 84, version: 6)))
        try pair.pump()
        #expect(pair.serverEvents.packets == [Array(segment.readableBytesView)])
        #expect(pair.clientEvents.packets == [Array(Self.devicePacket(.plain, size: 84, version: 6).readableBytesView)])
    }

    @Test func withoutOffloadPlainPacketsLoseTheirHeaderAndSegmentsAreDroppedAndCounted() throws {
        let pair = MuxPair(client: FullTunnelMuxTests.fullTunnel, server: FullTunnelMuxTests.fullTunnel)
        #expect(pair.client.sendDevicePacket(Self.devicePacket(.plain, size: 100)))
        #expect(!pair.client.sendDevicePacket(Self.devicePacket(Self.segment4, size: 3000)))
        var checksumOnly = PacketOffloadHeader.plain
        checksumOnly.flags = PacketOffloadHeader.needsChecksum
        checksumOnly.checksumStart = 20
        checksumOnly.checksumOffset = 6
        #expect(!pair.client.sendDevicePacket(Self.devicePacket(checksumOnly, size: 100)))
        #expect(pair.client.droppedPackets == 2)
        try pair.pump()
        let ip = Self.devicePacket(.plain, size: 100).skippingOffloadHeader()
        #expect(pair.serverEvents.packets == [Array(ip.readableBytesView)])
    }

    @Test func aPeersPacketWithABadHeaderIsRefusedAndCountedAndTheNextOneStillArrives() throws {
        let pair = MuxPair(client: Self.offload, server: Self.offload)
        var wrong = Self.segment4
        wrong.gsoType = PacketOffloadHeader.gsoTCPv6
        // Sent as a plain IP packet would be: the receiver reads its first bytes as a header.
        pair.client.sendIPPacket(Self.devicePacket(wrong, size: 2000))
        pair.client.sendIPPacket(ByteBuffer(bytes: [0, 0, 0, 0]))
        let good = Self.devicePacket(.plain, size: 60)
        pair.client.sendIPPacket(good)
        try pair.pump()
        #expect(pair.server.refusedPackets == 2)
        #expect(pair.serverEvents.packets == [Array(good.readableBytesView)])
    }

    @Test func theFairQueueHashesTheIPHeaderBehindTheOffloadHeader() {
        func tcp(port: UInt16) -> ByteBuffer {
            var ip = ByteBuffer(repeating: 0, count: 40)
            ip.setInteger(UInt8(0x45), at: 0)
            ip.setInteger(UInt8(6), at: 9)
            ip.setInteger(port, at: 20)
            var packet = ByteBuffer()
            PacketOffloadHeader.plain.write(to: &packet)
            packet.writeBuffer(&ip)
            return packet
        }
        let skip = PacketOffloadHeader.byteCount
        #expect(
            PacketFairQueue.flowHash(of: tcp(port: 1), skipping: skip)
                != PacketFairQueue.flowHash(of: tcp(port: 2), skipping: skip)
        )
        #expect(
            PacketFairQueue.flowHash(of: tcp(port: 1), skipping: skip)
                == PacketFairQueue.flowHash(of: tcp(port: 1).skippingOffloadHeader())
        )
    }
}
