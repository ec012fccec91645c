import TunnelProtocol

/// `tunnel-server --tun`: its TUN device, address pools, MTU and DNS.
public struct ServerTUNSettings: Sendable, Equatable {
    /// The IPv6 pool: derived from the server key (a ULA /64), none, or given.
    public enum IPv6Pool: Sendable, Equatable {
        case automatic
        case none
        case network(CIDR)
    }

    public var enabled = false
    /// IPv4 addresses for clients; host 1 is the server's.
    public var pool = CIDR(address: IPAddress.parse("10.77.0.0")!, prefixLength: 24)
    public var pool6 = IPv6Pool.automatic
    /// MTU of the TUN devices at both ends (told to clients).
    public var mtu = 1420
    /// DNS servers told to clients; empty: the server's own forwarder on its pool addresses, which asks the
    /// server's resolvers.
    public var dns: [IPAddress] = []
    /// Device name or pattern.
    public var deviceName = "tunnel%d"
    /// Where the server keeps what it changed (to undo it after a crash); default: /var/lib/tunnel-server/
    /// per network namespace and listen address.
    public var stateFile: String?

    public init() {}

    mutating func apply(file: inout ConfigFile) throws(ConfigError) {
        if let v = try file.boolean("tun") { self.enabled = v }
        if let v = try file.string("tun_pool") { self.pool = try Self.parsePool(v, origin: file.location("tun_pool")) }
        if let v = try file.string("tun_pool6") {
            self.pool6 = try Self.parsePool6(v, origin: file.location("tun_pool6"))
        }
        if let v = try file.integer("tun_mtu", range: TunnelAssignment.mtuRange) { self.mtu = v }
        if let list = try file.strings("tun_dns") {
            self.dns = try Self.parseAddresses(list, origin: file.location("tun_dns"))
        }
        if let v = try file.string("tun_name") {
            self.deviceName = try Self.parseDeviceName(v, origin: file.location("tun_name"))
        }
        if let v = try file.string("state_file") { self.stateFile = v }
    }

    public static func parsePool(_ text: String, origin: String) throws(ConfigError) -> CIDR {
        guard let cidr = CIDR.parse(text), !cidr.address.isIPv6, (8...30).contains(cidr.prefixLength),
            text.contains("/")
        else {
            throw ConfigError("\(origin): '\(text)' is not an IPv4 network from /8 to /30 (like 10.77.0.0/24)")
        }
        return cidr
    }

    public static func parsePool6(_ text: String, origin: String) throws(ConfigError) -> IPv6Pool {
        switch text.lowercased() {
        case "auto": return .automatic
        case "none", "off": return .none
        default:
            guard let cidr = CIDR.parse(text), cidr.address.isIPv6, (48...120).contains(cidr.prefixLength),
                text.contains("/")
            else {
                throw ConfigError(
                    "\(origin): '\(text)' is not auto, none, or an IPv6 network from /48 to /120 (like fd00:77::/64)"
                )
            }
            return .network(cidr)
        }
    }

    public static func parseAddresses(_ list: [String], origin: String) throws(ConfigError) -> [IPAddress] {
        var out: [IPAddress] = []
        for text in list {
            guard let address = IPAddress.parse(text) else {
                throw ConfigError("\(origin): '\(text)' is not an IP address")
            }
            out.append(address)
        }
        guard out.count <= TunnelAssignment.maxDNSServers else {
            throw ConfigError("\(origin): at most \(TunnelAssignment.maxDNSServers) DNS servers")
        }
        return out
    }

    public static func parseDeviceName(_ text: String, origin: String) throws(ConfigError) -> String {
        // The name is spliced into nftables rulesets and ip(8) arguments: letters, digits, '-', '_' and '.' only,
        // and one '%d' (the kernel's "a free number").
        var bytes = Array(text.utf8)
        if let index = bytes.indices.dropLast().first(where: {
            bytes[$0] == UInt8(ascii: "%") && bytes[$0 + 1] == UInt8(ascii: "d")
        }) {
            bytes.replaceSubrange(index...index + 1, with: [UInt8(ascii: "0")])
        }
        let allowed = bytes.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "-")
                || byte == UInt8(ascii: "_")
                || byte == UInt8(ascii: ".")
        }
        guard !text.isEmpty, text.utf8.count <= 15, allowed, text != ".", text != ".." else {
            throw ConfigError(
                "\(origin): '\(text)' is not a device name (1 to 15 letters, digits, '-', '_' or '.'; one '%d' picks a free number)"
            )
        }
        return text
    }
}

/// `tunnel-client --full-tunnel`: routes, DNS and leak protection.
public struct ClientFullTunnelSettings: Sendable, Equatable {
    /// Which resolver the client points the system at.
    public enum DNS: Sendable, Equatable {
        /// The server's (it names them in its assignment).
        case fromServer
        /// These addresses (reached through the tunnel).
        case servers([IPAddress])
        /// Leave /etc/resolv.conf alone (DNS may then leak past the tunnel).
        case unchanged
    }

    public var enabled = false
    /// Destinations that keep using the original route (not the tunnel).
    public var exclude: [CIDR] = []
    public var dns = DNS.fromServer
    /// Block all traffic outside the tunnel (except to the server) for as long as the client runs, also
    /// while the tunnel is down.
    public var killSwitch = false
    public var deviceName = "tunnel%d"
    /// Where the client keeps what it changed (to undo it after a crash); default: /var/lib/tunnel-client/ per
    /// network namespace.
    public var stateFile: String?

    public init() {}

    mutating func apply(file: inout ConfigFile) throws(ConfigError) {
        if let v = try file.boolean("full_tunnel") { self.enabled = v }
        if let list = try file.strings("exclude") {
            self.exclude = try Self.parseExcludes(list, origin: file.location("exclude"))
        }
        if let list = try file.strings("dns") { self.dns = try Self.parseDNS(list, origin: file.location("dns")) }
        if let v = try file.boolean("kill_switch") { self.killSwitch = v }
        if let v = try file.string("tun_name") {
            self.deviceName = try ServerTUNSettings.parseDeviceName(v, origin: file.location("tun_name"))
        }
        if let v = try file.string("state_file") { self.stateFile = v }
    }

    public static func parseExcludes(_ list: [String], origin: String) throws(ConfigError) -> [CIDR] {
        var out: [CIDR] = []
        for text in list {
            guard let cidr = CIDR.parse(text) else {
                throw ConfigError("\(origin): '\(text)' is not an address or CIDR prefix")
            }
            out.append(cidr.normalized)
        }
        return out
    }

    /// `server` (the default), `off`, or addresses.
    public static func parseDNS(_ list: [String], origin: String) throws(ConfigError) -> DNS {
        if list.count == 1 {
            switch list[0].lowercased() {
            case "server", "auto": return .fromServer
            case "off", "none", "unchanged": return .unchanged
            default: break
            }
        }
        let servers = try ServerTUNSettings.parseAddresses(list, origin: origin)
        guard !servers.isEmpty else {
            throw ConfigError("\(origin): name at least one DNS server, or 'server', or 'off'")
        }
        return .servers(servers)
    }
}
