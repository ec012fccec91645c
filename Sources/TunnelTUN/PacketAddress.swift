import NIOCore
import TunnelProtocol

/// An IPv4 or IPv6 address as plain integers: hashable and compared without allocating, for the per-packet
/// checks (anti-spoofing, routing by destination).
public enum PacketAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt64, UInt64)

    public init(_ address: IPAddress) {
        let b = address.bytes
        if b.count == 4 {
            self = .v4(b.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(as: UInt32.self)) })
        } else {
            self = b.withUnsafeBytes {
                .v6(
                    UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)),
                    UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
                )
            }
        }
    }

    public var ipAddress: IPAddress {
        switch self {
        case .v4(let v):
            return IPAddress(bytes: withUnsafeBytes(of: v.bigEndian) { Array($0) })!
        case .v6(let high, let low):
            return IPAddress(
                bytes: withUnsafeBytes(of: high.bigEndian) { Array($0) }
                    + withUnsafeBytes(of: low.bigEndian) { Array($0) }
            )!
        }
    }

    public var description: String { self.ipAddress.description }
}

/// The few header fields the tunnel reads from an IP packet. Nothing else of a packet is inspected: the
/// kernels at both ends do the rest.
public enum IPPacket {
    /// The source address, or nil when the bytes are not a plausible IPv4 or IPv6 header.
    @inlinable
    public static func source(of packet: ByteBuffer) -> PacketAddress? {
        Self.address(of: packet, v4Offset: 12, v6Offset: 8)
    }

    /// The destination address, or nil when the bytes are not a plausible IPv4 or IPv6 header.
    @inlinable
    public static func destination(of packet: ByteBuffer) -> PacketAddress? {
        Self.address(of: packet, v4Offset: 16, v6Offset: 24)
    }

    /// Whether the packet is TCP (IPv4 protocol or IPv6 next header 6; a packet with IPv6 extension
    /// headers counts as not TCP). A host answers TCP at once (ACKs; an ACK releases more data), so it is
    /// worth looking for the answer right after writing such a packet to the device.
    @inlinable
    public static func isTCP(_ packet: ByteBuffer) -> Bool {
        let start = packet.readerIndex
        guard let first = packet.getInteger(at: start, as: UInt8.self) else { return false }
        switch first >> 4 {
        case 4: return packet.readableBytes >= 20 && packet.getInteger(at: start + 9, as: UInt8.self) == 6
        case 6: return packet.readableBytes >= 40 && packet.getInteger(at: start + 6, as: UInt8.self) == 6
        default: return false
        }
    }

    @inlinable
    static func address(of packet: ByteBuffer, v4Offset: Int, v6Offset: Int) -> PacketAddress? {
        let start = packet.readerIndex
        guard let first = packet.getInteger(at: start, as: UInt8.self) else { return nil }
        switch first >> 4 {
        case 4:
            // IHL of at least 5 words and the whole header present.
            guard first & 0x0F >= 5, packet.readableBytes >= Int(first & 0x0F) * 4 else { return nil }
            return packet.getInteger(at: start + v4Offset, as: UInt32.self).map { .v4($0) }
        case 6:
            guard packet.readableBytes >= 40,
                let high = packet.getInteger(at: start + v6Offset, as: UInt64.self),
                let low = packet.getInteger(at: start + v6Offset + 8, as: UInt64.self)
            else { return nil }
            return .v6(high, low)
        default:
            return nil
        }
    }
}
