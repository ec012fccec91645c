/// A TAI64N timestamp (12 bytes: u64 BE `2^62 + 10 + seconds`, u32 BE nanoseconds), as WireGuard puts in its
/// first handshake message for replay protection. Comparable: later is greater.
public struct TAI64N: Comparable, Hashable, Sendable, CustomStringConvertible {
    /// Encoded length in bytes.
    public static let byteCount = 12
    private static let base: UInt64 = 0x4000_0000_0000_000A

    /// Seconds label (`2^62 + 10 + unix seconds`).
    public let seconds: UInt64
    /// Nanoseconds within the second.
    public let nanoseconds: UInt32

    /// From a wall-clock time. The low 24 bits of the nanoseconds are masked (as wireguard-go does) so the
    /// value does not fingerprint the host's clock.
    public init(unixNanoseconds: UInt64) {
        self.seconds = Self.base &+ unixNanoseconds / 1_000_000_000
        self.nanoseconds = UInt32(unixNanoseconds % 1_000_000_000) & ~0x00FF_FFFF
    }

    /// Decodes 12 bytes; `nil` for any other length.
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == Self.byteCount else { return nil }
        let b = Array(bytes)
        var s: UInt64 = 0
        for i in 0..<8 { s = s << 8 | UInt64(b[i]) }
        var n: UInt32 = 0
        for i in 8..<12 { n = n << 8 | UInt32(b[i]) }
        self.seconds = s
        self.nanoseconds = n
    }

    /// The 12 encoded bytes.
    public var bytes: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(12)
        for shift in stride(from: 56, through: 0, by: -8) {
            out.append(UInt8(truncatingIfNeeded: self.seconds >> UInt64(shift)))
        }
        for shift in stride(from: 24, through: 0, by: -8) {
            out.append(UInt8(truncatingIfNeeded: self.nanoseconds >> UInt32(shift)))
        }
        return out
    }

    public static func < (lhs: TAI64N, rhs: TAI64N) -> Bool {
        (lhs.seconds, lhs.nanoseconds) < (rhs.seconds, rhs.nanoseconds)
    }

    public var description: String {
        "TAI64N(\(Int64(bitPattern: self.seconds &- Self.base)).\(self.nanoseconds))"
    }
}
