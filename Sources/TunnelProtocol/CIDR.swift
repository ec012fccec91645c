/// An address prefix such as `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128); also an address
/// on a network with its prefix length (an interface's, host bits set).
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var prefixLength: Int

    public init(address: IPAddress, prefixLength: Int) {
        self.address = address
        self.prefixLength = prefixLength
    }

    public static func parse(_ text: String) -> CIDR? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let address = IPAddress.parse(String(parts[0])) else { return nil }
        let maxLength = address.bytes.count * 8
        var length = maxLength
        if parts.count == 2 {
            guard let l = Int(parts[1]), (0...maxLength).contains(l), parts[1].allSatisfy(\.isNumber) else {
                return nil
            }
            length = l
        }
        return CIDR(address: address, prefixLength: length)
    }

    /// Whether `bytes` (4 or 16) fall inside this prefix. IPv4-mapped IPv6 addresses match IPv4 prefixes.
    public func contains(_ bytes: [UInt8]) -> Bool {
        let candidate = self.address.bytes.count == 4 ? IPAddress.unmapped(bytes) : bytes
        guard candidate.count == self.address.bytes.count else { return false }
        var remaining = self.prefixLength
        for i in 0..<candidate.count where remaining > 0 {
            let bits = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            if candidate[i] & mask != self.address.bytes[i] & mask { return false }
            remaining -= bits
        }
        return true
    }

    public var description: String { "\(self.address)/\(self.prefixLength)" }
}

extension CIDR {
    /// The network itself (host bits cleared), as `ip route` wants it.
    public var normalized: CIDR {
        var bytes = self.address.bytes
        var remaining = self.prefixLength
        for i in 0..<bytes.count {
            let bits = min(8, max(0, remaining))
            bytes[i] &= bits == 0 ? 0 : UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            remaining -= 8
        }
        return CIDR(address: IPAddress(bytes: bytes)!, prefixLength: self.prefixLength)
    }
}
