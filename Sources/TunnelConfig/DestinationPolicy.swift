import TunnelProtocol

/// Which addresses the server may connect to (TCP streams) or send to (UDP), after name resolution.
///
/// Denied unless an `allow` prefix covers the address (and no longer prefix of the operator's `deny` does:
/// there the most specific prefix wins, `allow` a tie): the built-in list of loopback, private, shared,
/// link-local and unique-local ranges (`builtInDeny`, as Squid's `to_localhost` and SSRF guards do), the
/// operator's extra `deny` prefixes, the unspecified addresses (`0.0.0.0`, `::`: Linux delivers a connect to
/// them locally) and the server host's own addresses. An IPv6 address that carries an IPv4 address
/// (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) is judged by that IPv4 address too,
/// so a private range cannot be reached by spelling it in IPv6.
///
/// Pure: the host's addresses come in as a parameter (the runtime watches the interfaces).
public struct DestinationPolicy: Sendable, Hashable {
    /// What the server never reaches unless told to (`allow`).
    public static let builtInDeny: [CIDR] = [
        "0.0.0.0/8", "127.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12",
        "192.168.0.0/16", "::/128", "::1/128", "fc00::/7", "fe80::/10",
    ].map { CIDR.parse($0)! }

    /// The operator's additions to the built-in list (`deny = [...]`).
    public private(set) var deny: [CIDR]
    /// Prefixes exempt from the built-in rules, and from the operator's `deny` prefixes that are not more
    /// specific (`--allow`, `allow = [...]`).
    public private(set) var allow: [CIDR]

    public init(deny: [CIDR] = [], allow: [CIDR] = []) {
        self.deny = deny
        self.allow = allow
    }

    /// Why an address was refused (for the log line; the client only sees "not allowed").
    public enum Refusal: Sendable, Hashable, CustomStringConvertible {
        /// `0.0.0.0` or `::`, which reach the server itself.
        case unspecified
        /// One of the server host's own addresses.
        case serverAddress
        /// Inside a denied prefix.
        case denied(CIDR)

        public var description: String {
            switch self {
            case .unspecified: "the unspecified address"
            case .serverAddress: "an address of the server itself"
            case .denied(let prefix): "in denied range \(prefix)"
            }
        }
    }

    /// `nil` when the server may reach `bytes` (4 or 16 bytes), else why not. `hostAddresses` are the server
    /// host's own addresses, as 4 or 16 bytes each.
    public func refusal(for bytes: [UInt8], hostAddresses: Set<[UInt8]>) -> Refusal? {
        if let refusal = self.refusal(judging: bytes, hostAddresses: hostAddresses) { return refusal }
        guard let embedded = Self.embeddedIPv4(in: bytes) else { return nil }
        return self.refusal(judging: embedded, hostAddresses: hostAddresses)
    }

    /// The rules for one address, as it is (no embedded address looked at). Runs per UDP datagram: no allocation.
    private func refusal(judging address: [UInt8], hostAddresses: Set<[UInt8]>) -> Refusal? {
        var allowed = -1
        for prefix in self.allow where prefix.prefixLength > allowed && prefix.contains(address) {
            allowed = prefix.prefixLength
        }
        guard allowed >= 0 else {
            if address.allSatisfy({ $0 == 0 }) { return .unspecified }
            if hostAddresses.contains(address) { return .serverAddress }
            if let prefix = Self.builtInDeny.first(where: { $0.contains(address) })
                ?? self.deny.first(where: { $0.contains(address) })
            {
                return .denied(prefix)
            }
            return nil
        }
        // Allowed, unless a longer (more specific) prefix of the operator's deny list covers it too.
        return self.deny.first(where: { $0.prefixLength > allowed && $0.contains(address) }).map { .denied($0) }
    }

    /// The IPv4 address an IPv6 address carries, for the forms that reach it: IPv4-mapped (`::ffff:0:0/96`,
    /// RFC 4291 §2.5.5.2), the well-known NAT64 prefix (`64:ff9b::/96`, RFC 6052) and 6to4 (`2002::/16`,
    /// RFC 3056 §2).
    public static func embeddedIPv4(in bytes: [UInt8]) -> [UInt8]? {
        guard bytes.count == 16 else { return nil }
        let unmapped = IPAddress.unmapped(bytes)
        if unmapped.count == 4 { return unmapped }
        if bytes[0..<4] == [0x00, 0x64, 0xFF, 0x9B] && bytes[4..<12].allSatisfy({ $0 == 0 }) {
            return Array(bytes[12..<16])
        }
        if bytes[0] == 0x20 && bytes[1] == 0x02 { return Array(bytes[2..<6]) }
        return nil
    }
}

extension DestinationPolicy {
    /// One first-match rule: packets to `network` are allowed or dropped.
    public struct PacketRule: Sendable, Hashable {
        public var network: CIDR
        public var allow: Bool
    }

    /// The policy as first-match packet rules, for full-tunnel mode's firewall (nftables), where the server
    /// forwards packets instead of connecting. The same decisions as `refusal(for:hostAddresses:)`, for
    /// addresses that are not the host's own (those go to the input hook, where anything not allowed is
    /// dropped):
    /// - IPv4: `ordered4` (the `allow` and operator `deny` prefixes, longest first, `allow` first on a tie),
    ///   then `builtIn4` (drop); anything else passes.
    /// - IPv6: `ordered6`, then `builtIn6`, as for IPv4; then, for an address that carries an IPv4 address,
    ///   `embedded`: the IPv4 rules spelled in each IPv6 form (mapped, NAT64, 6to4), built-in ones as drops.
    public struct PacketRules: Sendable, Hashable {
        public var ordered4: [PacketRule]
        public var builtIn4: [CIDR]
        public var ordered6: [PacketRule]
        public var builtIn6: [CIDR]
        public var embedded: [PacketRule]
    }

    public var packetRules: PacketRules {
        let ordered =
            (self.allow.map { PacketRule(network: $0.normalized, allow: true) }
            + self.deny.map { PacketRule(network: $0.normalized, allow: false) })
            .enumerated()
            .sorted { a, b in
                if a.element.network.prefixLength != b.element.network.prefixLength {
                    return a.element.network.prefixLength > b.element.network.prefixLength
                }
                if a.element.allow != b.element.allow { return a.element.allow }
                return a.offset < b.offset
            }
            .map(\.element)
        let ordered4 = ordered.filter { !$0.network.address.isIPv6 }
        let builtIn4 = Self.builtInDeny.filter { !$0.address.isIPv6 }
        var embedded: [PacketRule] = []
        for form in Self.embeddingForms {
            embedded += ordered4.map { PacketRule(network: form($0.network), allow: $0.allow) }
            embedded += builtIn4.map { PacketRule(network: form($0), allow: false) }
        }
        return PacketRules(
            ordered4: ordered4,
            builtIn4: builtIn4,
            ordered6: ordered.filter { $0.network.address.isIPv6 },
            builtIn6: Self.builtInDeny.filter { $0.address.isIPv6 },
            embedded: embedded
        )
    }

    /// The IPv6 prefixes that carry an IPv4 prefix: IPv4-mapped, NAT64 (96 bits before the address) and 6to4
    /// (16 bits before it), as `embeddedIPv4(in:)` reads them.
    static let embeddingForms: [@Sendable (CIDR) -> CIDR] = [
        {
            CIDR(
                address: IPAddress(bytes: [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + $0.address.bytes)!,
                prefixLength: 96 + $0.prefixLength
            )
        },
        {
            CIDR(
                address: IPAddress(
                    bytes: [0x00, 0x64, 0xFF, 0x9B] + [UInt8](repeating: 0, count: 8) + $0.address.bytes
                )!,
                prefixLength: 96 + $0.prefixLength
            )
        },
        {
            CIDR(
                address: IPAddress(bytes: [0x20, 0x02] + $0.address.bytes + [UInt8](repeating: 0, count: 10))!,
                prefixLength: 16 + $0.prefixLength
            )
        },
    ]
}
