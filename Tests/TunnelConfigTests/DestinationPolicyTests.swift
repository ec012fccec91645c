import Testing
import TunnelProtocol

@testable import TunnelConfig

struct DestinationPolicyTests {
    func bytes(_ text: String) -> [UInt8] { IPAddress.parse(text)!.bytes }
    func cidrs(_ list: [String]) -> [CIDR] { list.map { CIDR.parse($0)! } }

    @Test(arguments: [
        "0.0.0.0", "0.1.2.3", "127.0.0.1", "127.1.2.3", "10.0.0.1", "100.64.0.1", "169.254.169.254", "172.16.0.1",
        "172.31.255.255", "192.168.1.1", "::", "::1", "fd00::1", "fc00::1", "fe80::1",
        // The same, spelled inside IPv6: IPv4-mapped, NAT64 (RFC 6052) and 6to4 (RFC 3056).
        "::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:169.254.169.254", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::", "2002:c0a8:101::1", "2002:a00:1::",
    ])
    func theBuiltInListRefusesLocalPrivateAndLinkLocal(address: String) {
        #expect(DestinationPolicy().refusal(for: self.bytes(address), hostAddresses: []) != nil, "\(address)")
    }

    @Test(arguments: [
        "1.1.1.1", "8.8.8.8", "172.32.0.1", "192.0.2.1", "100.128.0.1", "2001:db8::1", "2606:4700::1111",
        "::ffff:1.1.1.1", "64:ff9b::101:101", "2002:101:101::1",
    ])
    func publicAddressesAreAllowed(address: String) {
        #expect(DestinationPolicy().refusal(for: self.bytes(address), hostAddresses: []) == nil, "\(address)")
    }

    @Test func unspecifiedAddressesAreRefusedAsSuch() {
        #expect(DestinationPolicy().refusal(for: self.bytes("0.0.0.0"), hostAddresses: []) == .unspecified)
        #expect(DestinationPolicy().refusal(for: self.bytes("::"), hostAddresses: []) == .unspecified)
    }

    @Test func theHostsOwnAddressesAreRefused() {
        let host: Set<[UInt8]> = [self.bytes("198.51.100.7"), self.bytes("2001:db8::7")]
        let policy = DestinationPolicy()
        #expect(policy.refusal(for: self.bytes("198.51.100.7"), hostAddresses: host) == .serverAddress)
        #expect(policy.refusal(for: self.bytes("::ffff:198.51.100.7"), hostAddresses: host) == .serverAddress)
        #expect(policy.refusal(for: self.bytes("2001:db8::7"), hostAddresses: host) == .serverAddress)
        #expect(policy.refusal(for: self.bytes("198.51.100.8"), hostAddresses: host) == nil)
        #expect(
            DestinationPolicy(allow: self.cidrs(["198.51.100.7"])).refusal(
                for: self.bytes("198.51.100.7"),
                hostAddresses: host
            ) == nil
        )
    }

    @Test func allowOpensARangeAndTheMostSpecificPrefixWins() {
        let policy = DestinationPolicy(
            deny: self.cidrs(["127.0.0.2/32", "203.0.113.0/24"]),
            allow: self.cidrs(["127.0.0.0/8", "::1/128"])
        )
        let host: Set<[UInt8]> = [self.bytes("127.0.0.1"), self.bytes("::1")]
        #expect(
            policy.refusal(for: self.bytes("127.0.0.1"), hostAddresses: host) == nil,
            "allow covers the host's loopback"
        )
        #expect(policy.refusal(for: self.bytes("::ffff:127.0.0.1"), hostAddresses: host) == nil)
        #expect(policy.refusal(for: self.bytes("::1"), hostAddresses: host) == nil)
        #expect(
            policy.refusal(for: self.bytes("127.0.0.2"), hostAddresses: host) == .denied(CIDR.parse("127.0.0.2/32")!)
        )
        #expect(
            policy.refusal(for: self.bytes("203.0.113.9"), hostAddresses: host)
                == .denied(CIDR.parse("203.0.113.0/24")!)
        )
        #expect(
            policy.refusal(for: self.bytes("0.0.0.0"), hostAddresses: host) == .unspecified,
            "loopback allowed, not 0.0.0.0"
        )
        #expect(policy.refusal(for: self.bytes("::"), hostAddresses: host) == .unspecified)
        #expect(policy.refusal(for: self.bytes("10.1.1.1"), hostAddresses: host) != nil)
        let lan = DestinationPolicy(allow: self.cidrs(["192.168.1.0/24"]))
        #expect(lan.refusal(for: self.bytes("192.168.1.20"), hostAddresses: []) == nil)
        #expect(lan.refusal(for: self.bytes("192.168.2.20"), hostAddresses: []) != nil)
        let everything = DestinationPolicy(deny: self.cidrs(["10.0.0.0/8"]), allow: self.cidrs(["0.0.0.0/0", "::/0"]))
        #expect(
            everything.refusal(for: self.bytes("127.0.0.1"), hostAddresses: host) == nil,
            "allow lifts the built-in list"
        )
        #expect(everything.refusal(for: self.bytes("::"), hostAddresses: host) == nil)
        #expect(
            everything.refusal(for: self.bytes("10.0.0.1"), hostAddresses: host) != nil,
            "but not the operator's own deny"
        )
    }

    @Test func configAndFlagsAddToTheLists() throws {
        var file = try ConfigFile(path: "server.toml", text: "deny = [\"203.0.113.0/24\"]\nallow = [\"10.9.0.0/16\"]\n")
        var settings = ServerSettings()
        try settings.apply(file: &file)
        #expect(settings.destinationPolicy.deny == self.cidrs(["203.0.113.0/24"]))
        #expect(settings.destinationPolicy.allow == self.cidrs(["10.9.0.0/16"]))
        var bad = try ConfigFile(path: "server.toml", text: "allow = [\"10.9.0.0/33\"]\n")
        #expect(throws: ConfigError.self) { try settings.apply(file: &bad) }
    }
}

/// Full-tunnel mode renders the policy as first-match firewall rules; they must decide as the policy does.
struct DestinationPolicyPacketRulesTests {
    /// The firewall's decision, as nftables takes it from `FirewallRules.serverTable`'s forward chains.
    static func firewallAllows(_ rules: DestinationPolicy.PacketRules, _ bytes: [UInt8]) -> Bool {
        func firstMatch(_ list: [DestinationPolicy.PacketRule]) -> Bool? {
            list.first { $0.network.address.bytes.count == bytes.count && $0.network.contains(bytes) }.map(\.allow)
        }
        if bytes.count == 4 {
            if let verdict = firstMatch(rules.ordered4) { return verdict }
            return !rules.builtIn4.contains { $0.contains(bytes) }
        }
        switch firstMatch(rules.ordered6) {
        case false?: return false
        case nil where rules.builtIn6.contains(where: { $0.contains(bytes) }): return false
        default: break
        }
        return firstMatch(rules.embedded) ?? true
    }

    static func cidrs(_ list: [String]) -> [CIDR] { list.map { CIDR.parse($0)! } }

    static let policies: [DestinationPolicy] = [
        DestinationPolicy(),
        DestinationPolicy(allow: cidrs(["10.231.2.0/24", "fd31:2::/64"])),
        DestinationPolicy(
            deny: cidrs(["203.0.113.0/24", "2001:db8::/32"]),
            allow: cidrs(["192.168.1.0/24", "127.0.0.0/8", "::1/128"])
        ),
        // An operator deny more specific than an allow, an allow more specific than a deny, equal lengths.
        DestinationPolicy(
            deny: cidrs(["10.1.2.0/24", "8.8.0.0/16", "198.51.100.0/24"]),
            allow: cidrs(["10.0.0.0/8", "8.8.8.0/24", "198.51.100.0/24"])
        ),
        // Everything allowed, but one range.
        DestinationPolicy(deny: cidrs(["100.64.1.0/24"]), allow: cidrs(["0.0.0.0/0", "::/0"])),
        DestinationPolicy(allow: cidrs(["::ffff:0:0/96", "2002::/16"])),
        DestinationPolicy(deny: cidrs(["64:ff9b::/96"]), allow: cidrs(["169.254.169.0/24"])),
    ]

    /// Addresses at and around every prefix boundary of the policies, in every IPv6 spelling of IPv4.
    static func probes() -> [[UInt8]] {
        var out: [[UInt8]] = []
        var generator = SystemRandomNumberGenerator()
        let prefixes = DestinationPolicy.builtInDeny + policies.flatMap { $0.allow + $0.deny }
        for prefix in prefixes {
            let base = prefix.address.bytes
            for _ in 0..<24 {
                var bytes = base
                // Keep a random number of leading bits, randomise the rest.
                let keep = Int.random(in: max(0, prefix.prefixLength - 8)...(bytes.count * 8), using: &generator)
                for bit in keep..<(bytes.count * 8) where Bool.random(using: &generator) {
                    bytes[bit / 8] ^= UInt8(0x80) >> UInt8(bit % 8)
                }
                out.append(bytes)
            }
        }
        for _ in 0..<500 { out.append((0..<4).map { _ in UInt8.random(in: 0...255, using: &generator) }) }
        for _ in 0..<200 { out.append((0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }) }
        let v4 = out.filter { $0.count == 4 }
        for address in v4 {
            out.append([UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + address)
            out.append([0x00, 0x64, 0xFF, 0x9B] + [UInt8](repeating: 0, count: 8) + address)
            out.append([0x20, 0x02] + address + (0..<10).map { _ in UInt8.random(in: 0...255, using: &generator) })
        }
        return out
    }

    @Test func firewallRulesDecideAsThePolicy() {
        let probes = Self.probes()
        for policy in Self.policies {
            let rules = policy.packetRules
            for bytes in probes {
                let expected = policy.refusal(for: bytes, hostAddresses: []) == nil
                #expect(Self.firewallAllows(rules, bytes) == expected, "\(policy) \(IPAddress(bytes: bytes)!)")
            }
        }
    }

    @Test func rulesAreOrderedLongestFirstWithAllowFirstOnATie() {
        let rules = DestinationPolicy(
            deny: Self.cidrs(["10.1.0.0/16", "10.0.0.0/8"]),
            allow: Self.cidrs(["10.1.2.3/16", "10.0.0.0/8"])
        ).packetRules
        #expect(
            rules.ordered4.map(\.network.description) == ["10.1.0.0/16", "10.1.0.0/16", "10.0.0.0/8", "10.0.0.0/8"]
        )
        #expect(rules.ordered4.map(\.allow) == [true, false, true, false])
        #expect(
            rules.embedded.contains(
                DestinationPolicy.PacketRule(network: CIDR.parse("::ffff:10.0.0.0/104")!, allow: true)
            )
        )
        #expect(
            rules.embedded.contains(DestinationPolicy.PacketRule(network: CIDR.parse("2002:a9fe::/32")!, allow: false))
        )
    }
}
