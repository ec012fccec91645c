import TunnelProtocol

/// The nftables rulesets of full-tunnel mode, each in a table of its own so it can be removed (and a stale
/// one replaced) without touching anyone else's rules.
public enum FirewallRules {
    /// Where a client's packets may go, as first-match rules per family (the destination policy of the
    /// server, rendered: `DestinationPolicy.packetRules`). Prefixes are in `ip`/`ip6` syntax, host bits clear.
    public struct ClientDestinations: Sendable {
        public var ordered4: [(network: String, allow: Bool)]
        public var builtIn4: [String]
        public var ordered6: [(network: String, allow: Bool)]
        public var builtIn6: [String]
        public var embedded: [(network: String, allow: Bool)]

        public init(
            ordered4: [(network: String, allow: Bool)],
            builtIn4: [String],
            ordered6: [(network: String, allow: Bool)],
            builtIn6: [String],
            embedded: [(network: String, allow: Bool)]
        ) {
            self.ordered4 = ordered4
            self.builtIn4 = builtIn4
            self.ordered6 = ordered6
            self.builtIn6 = builtIn6
            self.embedded = embedded
        }

        /// Everything allowed (no policy).
        public static let open = ClientDestinations(
            ordered4: [],
            builtIn4: [],
            ordered6: [],
            builtIn6: [],
            embedded: []
        )
    }

    /// Server: NAT for the pools out of every other interface, MSS clamping both ways, no forwarding
    /// between clients, the destination policy for what clients may reach (forwarded, and this host itself,
    /// where only the DNS forwarder and ping on the gateway addresses are open unless allowed), packets
    /// conntrack cannot place dropped, and no packet leaving another interface with a pool address as source.
    public static func serverTable(
        name: String,
        device: String,
        pool4: String,
        pool6: String?,
        gateways: [IPAddress] = [],
        destinations: ClientDestinations = .open
    ) -> String {
        let from = "iifname \"\(device)\""
        // Refused destinations are answered (ICMP administratively prohibited), as the SOCKS path answers
        // "not allowed": the client's apps fail at once instead of waiting out a timeout.
        let refuse = "reject with icmpx type admin-prohibited"
        func family(_ network: String) -> String { network.contains(":") ? "ip6" : "ip" }
        func rules(_ list: [(network: String, allow: Bool)], allow: String, deny: String) -> [String] {
            list.map { "        \(family($0.network)) daddr \($0.network) \($0.allow ? allow : deny)" }
        }
        var lines = [
            "table inet \(name) {",
            "    chain input {",
            "        type filter hook input priority filter; policy accept;",
        ]
        for gateway in gateways {
            lines.append(
                "        iifname != \"\(device)\" \(family(gateway.description)) daddr \(gateway) meta l4proto { tcp, udp } th dport 53 drop"
            )
        }
        lines.append("        \(from) ct state established,related accept")
        for gateway in gateways {
            let ip = family(gateway.description)
            lines.append("        \(from) \(ip) daddr \(gateway) meta l4proto { tcp, udp } th dport 53 accept")
            lines.append(
                "        \(from) \(ip) daddr \(gateway) \(gateway.isIPv6 ? "icmpv6 type echo-request" : "icmp type echo-request") accept"
            )
        }
        lines += [
            "        \(from) jump client_to_host",
            "        \(from) \(refuse)",
            "    }",
            "    chain client_to_host {",
        ]
        lines += rules(destinations.ordered4 + destinations.ordered6, allow: "accept", deny: refuse)
        lines += [
            "    }",
            "    chain forward {",
            "        type filter hook forward priority filter; policy accept;",
            "        \(from) ct state invalid drop",
            "        \(from) oifname \"\(device)\" drop",
            "        \(from) tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu",
            "        oifname \"\(device)\" tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu",
            // A flow's first packet met the policy; the rest of it need not (the policy looks only at the
            // destination, which a flow keeps).
            "        \(from) ct state established,related accept",
            "        \(from) meta nfproto ipv4 jump client_v4",
            "        \(from) meta nfproto ipv6 jump client_v6",
            "        \(from) meta nfproto ipv6 jump client_v6_embedded",
            "    }",
            "    chain client_v4 {",
        ]
        lines += rules(destinations.ordered4, allow: "return", deny: refuse)
        if !destinations.builtIn4.isEmpty {
            lines.append("        ip daddr { \(destinations.builtIn4.joined(separator: ", ")) } \(refuse)")
        }
        lines += ["    }", "    chain client_v6 {"]
        lines += rules(destinations.ordered6, allow: "return", deny: refuse)
        if !destinations.builtIn6.isEmpty {
            lines.append("        ip6 daddr { \(destinations.builtIn6.joined(separator: ", ")) } \(refuse)")
        }
        lines += ["    }", "    chain client_v6_embedded {"]
        lines += rules(destinations.embedded, allow: "return", deny: refuse)
        lines += [
            "    }",
            "    chain postrouting {",
            "        type nat hook postrouting priority srcnat; policy accept;",
            "        ip saddr \(pool4) oifname != \"\(device)\" masquerade",
        ]
        if let pool6 { lines.append("        ip6 saddr \(pool6) oifname != \"\(device)\" masquerade") }
        lines += [
            "    }",
            "    chain leak_guard {",
            "        type filter hook postrouting priority srcnat + 10; policy accept;",
            "        ip saddr \(pool4) oifname != \"\(device)\" drop",
        ]
        if let pool6 { lines.append("        ip6 saddr \(pool6) oifname != \"\(device)\" drop") }
        lines += ["    }", "}"]
        return lines.joined(separator: "\n") + "\n"
    }

    /// Client kill switch: nothing leaves except through the tunnel device, to the tunnel server itself, to
    /// excluded networks, on loopback, and the link-level chatter that keeps the uplink working (DHCP,
    /// IPv6 neighbour discovery). Everything else is rejected, so apps fail fast instead of leaking.
    public static func killSwitchTable(
        name: String,
        device: String,
        server: IPAddress,
        port: Int,
        exclude: [String]
    ) -> String {
        var lines = [
            "table inet \(name) {",
            "    chain output {",
            "        type filter hook output priority filter; policy accept;",
            "        oifname \"lo\" accept",
            "        oifname \"\(device)\" accept",
            "        \(server.isIPv6 ? "ip6" : "ip") daddr \(server) tcp dport \(port) accept",
            "        udp sport 68 udp dport 67 accept",
            "        udp sport 546 udp dport 547 accept",
            "        icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept",
        ]
        for network in exclude {
            lines.append("        \(network.contains(":") ? "ip6" : "ip") daddr \(network) accept")
        }
        lines += [
            "        reject with icmpx type admin-prohibited",
            "    }",
            "}",
        ]
        return lines.joined(separator: "\n") + "\n"
    }
}
