import NIOCore

/// What the server tells a full-tunnel client after key confirmation, in a CONTROL frame (docs/PROTOCOL.md §5):
/// the client's inner addresses, the MTU of the TUN devices, and the DNS servers to use through the tunnel.
///
/// Encoded as TLVs like the handshake parameters (`type u8, length u16 BE, value`); unknown types are
/// skipped, known ones must have their exact size, so later versions can add fields.
public struct TunnelAssignment: Hashable, Sendable {
    /// An address on the inner network with its prefix length.
    public typealias Interface = CIDR

    /// The client's IPv4 address.
    public var ipv4: Interface?
    /// The client's IPv6 address, when the server has an IPv6 pool. Without it the client blocks IPv6.
    public var ipv6: Interface?
    /// MTU of the TUN devices.
    public var mtu: Int = 1420
    /// DNS servers reachable through the tunnel.
    public var dnsServers: [IPAddress] = []

    public init(ipv4: Interface? = nil, ipv6: Interface? = nil, mtu: Int = 1420, dnsServers: [IPAddress] = []) {
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.mtu = mtu
        self.dnsServers = dnsServers
    }

    /// Smallest and largest MTU accepted (IPv6 needs 1280).
    public static let mtuRange = 1280...9000
    /// Most DNS servers carried.
    public static let maxDNSServers = 4

    enum Tag {
        static let ipv4: UInt8 = 0x10
        static let ipv6: UInt8 = 0x11
        static let mtu: UInt8 = 0x12
        static let dns: UInt8 = 0x13
    }

    /// Appends the TLVs.
    public func encode(into buffer: inout ByteBuffer) {
        func tlv(_ tag: UInt8, _ bytes: [UInt8]) {
            buffer.writeTLV(tag) { $0.writeBytes(bytes) }
        }
        if let v4 = self.ipv4 { tlv(Tag.ipv4, v4.address.bytes + [UInt8(v4.prefixLength)]) }
        if let v6 = self.ipv6 { tlv(Tag.ipv6, v6.address.bytes + [UInt8(v6.prefixLength)]) }
        tlv(Tag.mtu, [UInt8(self.mtu >> 8), UInt8(self.mtu & 0xFF)])
        for server in self.dnsServers.prefix(Self.maxDNSServers) { tlv(Tag.dns, server.bytes) }
    }

    /// Parses the TLVs of a CONTROL frame. An assignment needs an IPv4 address; everything else is optional.
    public static func decode(_ buffer: ByteBuffer) throws(ProtocolError) -> TunnelAssignment {
        var buffer = buffer
        var assignment = TunnelAssignment()
        while let (tag, field) = try buffer.readTLV(malformed: ProtocolError.malformedFrame("truncated CONTROL field"))
        {
            let value = Array(field.readableBytesView)
            switch tag {
            case Tag.ipv4: assignment.ipv4 = try Self.interface(value, addressBytes: 4)
            case Tag.ipv6: assignment.ipv6 = try Self.interface(value, addressBytes: 16)
            case Tag.mtu:
                guard value.count == 2 else {
                    throw ProtocolError.malformedFrame("CONTROL MTU has length \(value.count)")
                }
                let mtu = Int(value[0]) << 8 | Int(value[1])
                guard Self.mtuRange.contains(mtu) else {
                    throw ProtocolError.malformedFrame("CONTROL MTU \(mtu) out of range")
                }
                assignment.mtu = mtu
            case Tag.dns:
                guard let server = IPAddress(bytes: value) else {
                    throw ProtocolError.malformedFrame("CONTROL DNS server has length \(value.count)")
                }
                guard assignment.dnsServers.count < Self.maxDNSServers else {
                    throw ProtocolError.malformedFrame("more than \(Self.maxDNSServers) DNS servers")
                }
                assignment.dnsServers.append(server)
            default:
                continue
            }
        }
        guard assignment.ipv4 != nil else {
            throw ProtocolError.malformedFrame("CONTROL assignment without an IPv4 address")
        }
        return assignment
    }

    private static func interface(_ value: [UInt8], addressBytes: Int) throws(ProtocolError) -> Interface {
        guard value.count == addressBytes + 1, let address = IPAddress(bytes: Array(value[0..<addressBytes])) else {
            throw ProtocolError.malformedFrame("CONTROL address has length \(value.count)")
        }
        let prefix = Int(value[addressBytes])
        // The prefix must leave room for the client and the server's gateway.
        guard prefix >= 1, prefix <= addressBytes * 8 - 2 else {
            throw ProtocolError.malformedFrame("CONTROL prefix /\(prefix) out of range")
        }
        return Interface(address: address, prefixLength: prefix)
    }
}
