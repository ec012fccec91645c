import NIOCore

/// Where a stream goes: a host (IPv4, IPv6 or a name for the server to resolve) and a port.
///
/// On the wire it uses SOCKS5's address encoding (RFC 1928 §5): `atyp u8` (1 IPv4, 3 name, 4 IPv6),
/// the address (4 bytes, 1-byte length + name, or 16 bytes), then `port u16 BE`.
public struct TargetAddress: Hashable, Sendable, CustomStringConvertible {
    /// The host part.
    public enum Host: Hashable, Sendable {
        case ipv4(UInt32)
        case ipv6([UInt8])
        case domain(String)
    }

    /// SOCKS5 address type codes.
    public enum AddressType {
        public static let ipv4: UInt8 = 0x01
        public static let domain: UInt8 = 0x03
        public static let ipv6: UInt8 = 0x04
    }

    public var host: Host
    public var port: UInt16

    public init(host: Host, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// The unspecified IPv4 address and port 0 (what a reply carries when there is nothing to say).
    public static let unspecified = TargetAddress(host: .ipv4(0), port: 0)

    /// Number of bytes `writeTargetAddress` produces.
    public var encodedLength: Int {
        switch self.host {
        case .ipv4: return 1 + 4 + 2
        case .ipv6: return 1 + 16 + 2
        case .domain(let name): return 1 + 1 + name.utf8.count + 2
        }
    }

    public var description: String {
        switch self.host {
        case .ipv4(let a):
            return "\(a >> 24).\(a >> 16 & 0xFF).\(a >> 8 & 0xFF).\(a & 0xFF):\(self.port)"
        case .ipv6(let bytes):
            return "[\(Self.formatIPv6(bytes))]:\(self.port)"
        case .domain(let name):
            return "\(name):\(self.port)"
        }
    }

    /// The host alone, as text (IPv6 without brackets).
    public var hostString: String {
        switch self.host {
        case .ipv4(let a): return "\(a >> 24).\(a >> 16 & 0xFF).\(a >> 8 & 0xFF).\(a & 0xFF)"
        case .ipv6(let bytes): return Self.formatIPv6(bytes)
        case .domain(let name): return name
        }
    }

    /// RFC 5952 text form of a 16-byte IPv6 address (longest run of zero groups compressed).
    public static func formatIPv6(_ bytes: [UInt8]) -> String {
        precondition(bytes.count == 16)
        let groups = (0..<8).map { UInt16(bytes[2 * $0]) << 8 | UInt16(bytes[2 * $0 + 1]) }
        var bestStart = -1
        var bestLength = 0
        var index = 0
        while index < 8 {
            if groups[index] == 0 {
                var end = index
                while end < 8 && groups[end] == 0 { end += 1 }
                if end - index > bestLength && end - index >= 2 {
                    bestStart = index
                    bestLength = end - index
                }
                index = end
            } else {
                index += 1
            }
        }
        func hex(_ range: Range<Int>) -> String { range.map { String(groups[$0], radix: 16) }.joined(separator: ":") }
        if bestStart < 0 { return hex(0..<8) }
        return hex(0..<bestStart) + "::" + hex((bestStart + bestLength)..<8)
    }
}

/// Why a target address could not be decoded.
public enum TargetAddressError: Error, Hashable, Sendable {
    /// The address type byte is not 1, 3 or 4 (SOCKS5 reply 0x08).
    case unsupportedAddressType(UInt8)
    /// A domain name of length zero, or one that is not valid UTF-8.
    case invalidDomain
}

extension ByteBuffer {
    /// Writes `atyp ‖ addr ‖ port`.
    @discardableResult
    public mutating func writeTargetAddress(_ address: TargetAddress) -> Int {
        let start = self.writerIndex
        switch address.host {
        case .ipv4(let a):
            self.writeInteger(TargetAddress.AddressType.ipv4)
            self.writeInteger(a)
        case .ipv6(let bytes):
            self.writeInteger(TargetAddress.AddressType.ipv6)
            self.writeBytes(bytes)
        case .domain(let name):
            let utf8 = Array(name.utf8.prefix(255))
            self.writeInteger(TargetAddress.AddressType.domain)
            self.writeInteger(UInt8(utf8.count))
            self.writeBytes(utf8)
        }
        self.writeInteger(address.port)
        return self.writerIndex - start
    }

    /// Reads `atyp ‖ addr ‖ port`. `nil` (reader index untouched) when more bytes are needed; throws when the
    /// bytes can never be an address.
    public mutating func readTargetAddress() throws(TargetAddressError) -> TargetAddress? {
        let save = self.readerIndex
        guard let type = self.readInteger(as: UInt8.self) else { return nil }
        let host: TargetAddress.Host
        switch type {
        case TargetAddress.AddressType.ipv4:
            guard let a = self.readInteger(as: UInt32.self) else {
                self.moveReaderIndex(to: save)
                return nil
            }
            host = .ipv4(a)
        case TargetAddress.AddressType.ipv6:
            guard let bytes = self.readBytes(length: 16) else {
                self.moveReaderIndex(to: save)
                return nil
            }
            host = .ipv6(bytes)
        case TargetAddress.AddressType.domain:
            guard let length = self.readInteger(as: UInt8.self), let bytes = self.readBytes(length: Int(length)) else {
                self.moveReaderIndex(to: save)
                return nil
            }
            guard length > 0, let name = String(validating: bytes, as: UTF8.self), !name.utf8.contains(0) else {
                self.moveReaderIndex(to: save)
                throw .invalidDomain
            }
            host = .domain(name)
        default:
            self.moveReaderIndex(to: save)
            throw .unsupportedAddressType(type)
        }
        guard let port = self.readInteger(as: UInt16.self) else {
            self.moveReaderIndex(to: save)
            return nil
        }
        return TargetAddress(host: host, port: port)
    }
}
