import TunnelProtocol

/// The nftables rulesets of full-tunnel mode, each in a table of its own so it can be removed (and a stale
/// one replaced) without touching anyone else's rules.
public enum FirewallRules {
    /// Server: NAT for the pools out of every other interface, MSS clamping both ways, no forwarding
    /// between clients, and the DNS forwarder on the gateway addresses only for packets from the tunnel.
    public static func serverTable(name: String, device: String, pool4: String, pool6: String?, gateways: [IPAddress] = []) -> String {
        var lines = [
            "table inet \(name) {",
            "    chain input {",
            "        type filter hook input priority filter; policy accept;",
        ]
        for gateway in gateways {
            lines.append("        iifname != \"\(device)\" \(gateway.isIPv6 ? "ip6" : "ip") daddr \(gateway) meta l4proto { tcp, udp } th dport 53 drop")
        }
        lines += [
            "    }",
            "    chain forward {",
            "        type filter hook forward priority filter; policy accept;",
            "        iifname \"\(device)\" oifname \"\(device)\" drop",
            "        iifname \"\(device)\" tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu",
            "        oifname \"\(device)\" tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu",
            "    }",
            "    chain postrouting {",
            "        type nat hook postrouting priority srcnat; policy accept;",
            "        ip saddr \(pool4) oifname != \"\(device)\" masquerade",
        ]
        if let pool6 { lines.append("        ip6 saddr \(pool6) oifname != \"\(device)\" masquerade") }
        lines += ["    }", "}"]
        return lines.joined(separator: "\n") + "\n"
    }

    /// Client kill switch: nothing leaves except through the tunnel device, to the tunnel server itself, to
    /// excluded networks, on loopback, and the link-level chatter that keeps the uplink working (DHCP,
    /// IPv6 neighbour discovery). Everything else is rejected, so apps fail fast instead of leaking.
    public static func killSwitchTable(name: String, device: String, server: IPAddress, port: Int, exclude: [String]) -> String {
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
