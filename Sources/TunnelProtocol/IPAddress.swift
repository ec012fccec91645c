/// An IPv4 or IPv6 address as bytes.
public struct IPAddress: Hashable, Sendable, CustomStringConvertible {
    /// 4 or 16 bytes, network order.
    public var bytes: [UInt8]
    public var isIPv6: Bool { self.bytes.count == 16 }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2) as its 4 IPv4 bytes; any other address
    /// as it is. Dual-stack sockets report IPv4 peers in this form.
    public static func unmapped(_ bytes: [UInt8]) -> [UInt8] {
        guard bytes.count == 16, bytes[10] == 0xFF, bytes[11] == 0xFF, bytes[0..<10].allSatisfy({ $0 == 0 }) else {
            return bytes
        }
        return Array(bytes[12..<16])
    }

    /// Whether 4 or 16 bytes are a loopback address (127.0.0.0/8, ::1).
    public static func isLoopback(_ bytes: [UInt8]) -> Bool {
        if bytes.count == 4 { return bytes[0] == 127 }
        return bytes.count == 16 && bytes[15] == 1 && bytes[0..<15].allSatisfy { $0 == 0 }
    }

    /// Parses dotted IPv4 or RFC 4291 IPv6 text (with `::` and an optional embedded IPv4 tail).
    public static func parse(_ text: String) -> IPAddress? {
        if !text.contains(":") { return Self.parseIPv4(Substring(text)).flatMap { IPAddress(bytes: $0) } }
        return Self.parseIPv6(text).flatMap { IPAddress(bytes: $0) }
    }

    public static func parseIPv4(_ text: Substring) -> [UInt8]? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var out: [UInt8] = []
        for part in parts {
            guard !part.isEmpty, part.count <= 3, part.allSatisfy(\.isASCII), let v = UInt8(part) else { return nil }
            guard part == "0" || !part.hasPrefix("0") else { return nil }
            out.append(v)
        }
        return out
    }

    public static func parseIPv6(_ text: String) -> [UInt8]? {
        let halves = text.components(separatedBy: "::")
        guard halves.count <= 2 else { return nil }
        func groups(_ s: String) -> [UInt16]? {
            guard !s.isEmpty else { return [] }
            var out: [UInt16] = []
            let parts = s.split(separator: ":", omittingEmptySubsequences: false)
            for (i, part) in parts.enumerated() {
                if i == parts.count - 1, part.contains(".") {
                    guard let v4 = parseIPv4(part) else { return nil }
                    out.append(UInt16(v4[0]) << 8 | UInt16(v4[1]))
                    out.append(UInt16(v4[2]) << 8 | UInt16(v4[3]))
                    continue
                }
                guard (1...4).contains(part.count), let v = UInt16(part, radix: 16) else { return nil }
                out.append(v)
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        var all: [UInt16]
        if halves.count == 2 {
            guard let tail = groups(halves[1]), head.count + tail.count <= 7 else { return nil }
            all = head + [UInt16](repeating: 0, count: 8 - head.count - tail.count) + tail
        } else {
            guard head.count == 8 else { return nil }
            all = head
        }
        return all.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xFF)] }
    }

    public var description: String {
        if self.isIPv6 { return TargetAddress.formatIPv6(self.bytes) }
        return self.bytes.map(String.init).joined(separator: ".")
    }
}

extension String {
    func components(separatedBy separator: String) -> [String] {
        var result: [String] = []
        var rest = Substring(self)
        while let range = rest.firstRange(of: separator) {
            result.append(String(rest[..<range.lowerBound]))
            rest = rest[range.upperBound...]
        }
        result.append(String(rest))
        return result
    }
}

extension TargetAddress {
    /// A target from text: an IPv4 or IPv6 literal (without brackets) becomes an address, anything else a
    /// name for the server to resolve. `nil` for an empty or over-long name.
    public init?(host: String, port: UInt16) {
        if let ip = IPAddress.parse(host) {
            if ip.isIPv6 {
                self.init(host: .ipv6(ip.bytes), port: port)
            } else {
                let b = ip.bytes
                self.init(
                    host: .ipv4(UInt32(b[0]) << 24 | UInt32(b[1]) << 16 | UInt32(b[2]) << 8 | UInt32(b[3])),
                    port: port
                )
            }
            return
        }
        guard !host.isEmpty, host.utf8.count <= 255, !host.utf8.contains(0) else { return nil }
        self.init(host: .domain(host), port: port)
    }
}
