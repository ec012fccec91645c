import NIOCore

/// Segmentation offload for full-tunnel packets (docs/PROTOCOL.md §5.1): with the `packetOffload` feature,
/// each IP_PACKET frame starts with the 10-byte `struct virtio_net_hdr` that a Linux TUN device opened with
/// IFF_VNET_HDR reads and writes before every packet. A TCP segment of up to 64 KiB then crosses the tunnel as
/// one packet whose header says how the receiving kernel cuts it into MTU-sized segments (`gsoSize`) and where
/// its checksum still has to be completed (`csumStart`, `csumOffset`): one device read, one frame and one
/// device write instead of some forty of each, as a virtual machine's NIC and wireguard-go do.
///
/// Fields are little-endian (the virtio 1.0 layout, which a little-endian host's TUN device uses natively).
public struct PacketOffloadHeader: Hashable, Sendable {
    public static let byteCount = 10

    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at `csumStart + csumOffset` holds only the pseudo-header sum.
    public static let needsChecksum: UInt8 = 1
    /// VIRTIO_NET_HDR_F_DATA_VALID: the checksum was verified.
    public static let dataValid: UInt8 = 2
    /// VIRTIO_NET_HDR_GSO_* values of `gsoType` (without the ECN bit).
    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoTCPv6: UInt8 = 4
    /// VIRTIO_NET_HDR_GSO_ECN: the segments carry ECN's CWR the way the first one does.
    public static let gsoECN: UInt8 = 0x80

    public var flags: UInt8
    public var gsoType: UInt8
    public var headerLength: UInt16
    public var gsoSize: UInt16
    public var checksumStart: UInt16
    public var checksumOffset: UInt16

    /// A finished packet: no segmentation, checksums complete.
    public static let plain = PacketOffloadHeader(
        flags: 0,
        gsoType: 0,
        headerLength: 0,
        gsoSize: 0,
        checksumStart: 0,
        checksumOffset: 0
    )

    public init(
        flags: UInt8,
        gsoType: UInt8,
        headerLength: UInt16,
        gsoSize: UInt16,
        checksumStart: UInt16,
        checksumOffset: UInt16
    ) {
        self.flags = flags
        self.gsoType = gsoType
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.checksumStart = checksumStart
        self.checksumOffset = checksumOffset
    }

    /// The header at the start of `buffer`'s readable bytes, nil when fewer than 10 bytes are readable.
    public init?(from buffer: ByteBuffer) {
        let at = buffer.readerIndex
        guard buffer.readableBytes >= Self.byteCount,
            let flags = buffer.getInteger(at: at, as: UInt8.self),
            let gsoType = buffer.getInteger(at: at + 1, as: UInt8.self),
            let headerLength = buffer.getInteger(at: at + 2, endianness: .little, as: UInt16.self),
            let gsoSize = buffer.getInteger(at: at + 4, endianness: .little, as: UInt16.self),
            let checksumStart = buffer.getInteger(at: at + 6, endianness: .little, as: UInt16.self),
            let checksumOffset = buffer.getInteger(at: at + 8, endianness: .little, as: UInt16.self)
        else { return nil }
        self.init(
            flags: flags,
            gsoType: gsoType,
            headerLength: headerLength,
            gsoSize: gsoSize,
            checksumStart: checksumStart,
            checksumOffset: checksumOffset
        )
    }

    /// Writes the header (10 bytes).
    public func write(to buffer: inout ByteBuffer) {
        buffer.writeInteger(self.flags)
        buffer.writeInteger(self.gsoType)
        buffer.writeInteger(self.headerLength, endianness: .little)
        buffer.writeInteger(self.gsoSize, endianness: .little)
        buffer.writeInteger(self.checksumStart, endianness: .little)
        buffer.writeInteger(self.checksumOffset, endianness: .little)
    }

    /// A finished packet that a peer without offload can take as it is.
    public var isPlain: Bool {
        self.flags & Self.needsChecksum == 0 && self.gsoType == Self.gsoNone
    }

    /// Whether a header that came over the tunnel in front of `packet` (an IP packet of `packetLength` bytes
    /// whose version nibble is `ipVersion`) describes something this end's kernel should be handed: known flags
    /// only, TCP segmentation of the packet's own IP version only, a segment size when segmenting, and a
    /// checksum position inside the packet. The kernel checks the rest (virtio_net_hdr_to_skb), as it does for
    /// a virtual machine's packets.
    public func isAcceptable(ipVersion: UInt8, packetLength: Int) -> Bool {
        guard self.flags & ~(Self.needsChecksum | Self.dataValid) == 0 else { return false }
        if self.flags & Self.needsChecksum != 0 {
            guard Int(self.checksumStart) + Int(self.checksumOffset) + 2 <= packetLength else { return false }
        }
        switch self.gsoType & ~Self.gsoECN {
        case Self.gsoNone:
            return self.gsoType == Self.gsoNone
        case Self.gsoTCPv4:
            return ipVersion == 4 && self.gsoSize > 0 && self.flags & Self.needsChecksum != 0
        case Self.gsoTCPv6:
            return ipVersion == 6 && self.gsoSize > 0 && self.flags & Self.needsChecksum != 0
        default:
            return false
        }
    }
}

extension ByteBuffer {
    /// A device packet (offload header + IP packet) seen as its IP packet: the same storage, the reader index
    /// past the header. No copy.
    @inlinable
    public func skippingOffloadHeader() -> ByteBuffer {
        var packet = self
        packet.moveReaderIndex(forwardBy: Swift.min(PacketOffloadHeader.byteCount, packet.readableBytes))
        return packet
    }
}
