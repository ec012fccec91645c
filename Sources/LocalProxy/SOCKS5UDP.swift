import NIOCore
import TunnelProtocol

/// The SOCKS5 UDP request header (RFC 1928 §7): `RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA`.
///
/// Inside the tunnel a datagram travels as `ATYP ADDR PORT DATA` (the header minus RSV and FRAG), so both
/// conversions are a slice or a 3-byte prefix.
public enum SOCKS5UDP {
    /// Why an application datagram is dropped (RFC 1928 §7 allows silent drops).
    public enum Drop: Error, Equatable, Sendable {
        /// Shorter than a header.
        case truncated
        /// RSV is not zero.
        case reserved
        /// Fragmented (FRAG ≠ 0): this relay does not reassemble.
        case fragmented
        /// The address cannot be parsed.
        case badAddress
    }

    /// The tunnel payload for an application datagram: a slice of it without RSV and FRAG.
    public static func tunnelPayload(fromApplication datagram: ByteBuffer) -> Result<ByteBuffer, Drop> {
        guard datagram.readableBytes >= 3 + 7 else { return .failure(.truncated) }
        guard datagram.getInteger(at: datagram.readerIndex, as: UInt16.self) == 0 else { return .failure(.reserved) }
        guard datagram.getInteger(at: datagram.readerIndex + 2, as: UInt8.self) == 0 else {
            return .failure(.fragmented)
        }
        var payload = datagram.getSlice(at: datagram.readerIndex + 3, length: datagram.readableBytes - 3)!
        var probe = payload
        do {
            guard try probe.readTargetAddress() != nil else { return .failure(.truncated) }
        } catch {
            return .failure(.badAddress)
        }
        payload.moveReaderIndex(to: payload.readerIndex)
        return .success(payload)
    }

    /// The datagram to send the application for a tunnel payload (`ATYP ADDR PORT DATA`, the reply's source).
    public static func applicationDatagram(fromTunnel payload: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer
    {
        var out = allocator.buffer(capacity: 3 + payload.readableBytes)
        out.writeBytes([0, 0, 0])
        out.writeImmutableBuffer(payload)
        return out
    }

    /// Splits a tunnel payload into its address and data; `nil` when malformed.
    public static func split(_ payload: ByteBuffer) -> (TargetAddress, ByteBuffer)? {
        var rest = payload
        guard let address = try? rest.readTargetAddress() else { return nil }
        return (address, rest)
    }

    /// A tunnel payload from an address and data.
    public static func tunnelPayload(
        from address: TargetAddress,
        data: ByteBuffer,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var out = allocator.buffer(capacity: address.encodedLength + data.readableBytes)
        out.writeTargetAddress(address)
        out.writeImmutableBuffer(data)
        return out
    }
}
