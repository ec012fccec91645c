import TunnelProtocol

#if canImport(Glibc)
import Glibc
#endif

/// The host configuration steps of full-tunnel mode, each recorded in a `HostChangeJournal` so it is
/// undone on exit or after a crash. They run `ip` and `nft` (iproute2, nftables) through `commands`, and
/// rewrite the resolver file at `resolverPath`: `live` is this host, a test passes a double and a file of
/// its own.
public struct HostNetwork: Sendable {
    public let commands: any HostCommands
    public let resolverPath: String

    public init(commands: any HostCommands, resolverPath: String = "/etc/resolv.conf") {
        self.commands = commands
        self.resolverPath = resolverPath
    }

    /// This host.
    public static let live = HostNetwork(commands: SystemCommand.live)

    /// How the host reaches an address now: through a gateway, or on-link, out of a device.
    public struct Path: Hashable, Sendable, CustomStringConvertible {
        public var gateway: String?
        public var device: String
        public init(gateway: String?, device: String) {
            self.gateway = gateway
            self.device = device
        }
        public var description: String { self.gateway.map { "via \($0) dev \(self.device)" } ?? "dev \(self.device)" }
        /// The `ip route` arguments that send a destination this way.
        var routeArguments: [String] { (self.gateway.map { ["via", $0] } ?? []) + ["dev", self.device] }
    }

    /// Parses `ip route get ADDRESS`: `10.1.2.3 via 192.168.1.1 dev eth0 src 192.168.1.5 uid 0`.
    /// Nil for local, unreachable, blackhole or prohibited answers.
    public static func parseRouteGet(_ output: String) -> Path? {
        let firstLine = output.split(separator: "\n").first.map(String.init) ?? ""
        let words = firstLine.split(separator: " ").map(String.init)
        guard let first = words.first, !["local", "unreachable", "blackhole", "prohibit", "throw"].contains(first)
        else { return nil }
        var gateway: String?
        var device: String?
        var i = 0
        while i + 1 < words.count {
            switch words[i] {
            case "via":
                gateway = words[i + 1]
                // `via inet6 fe80::1` (an IPv4 route through an IPv6 gateway) names the family first.
                if gateway == "inet" || gateway == "inet6", i + 2 < words.count {
                    gateway = words[i + 2]
                    i += 1
                }
                i += 2
            case "dev":
                device = words[i + 1]
                i += 2
            default:
                i += 1
            }
        }
        guard let device, device != "lo" else { return nil }
        return Path(gateway: gateway, device: device)
    }

    /// How the host reaches `address` right now (before any route of ours is in place).
    public func currentPath(to address: IPAddress) -> Path? {
        let result = self.commands.run(["ip", address.isIPv6 ? "-6" : "-4", "route", "get", address.description])
        guard result.succeeded else { return nil }
        return Self.parseRouteGet(result.output)
    }

    /// Gives a device its addresses and MTU and brings it up.
    public func configureDevice(
        _ name: String,
        mtu: Int,
        addresses: [TunnelAssignment.Interface]
    ) throws(SystemCommand.Failure) {
        try self.commands.check(["ip", "link", "set", "dev", name, "mtu", String(mtu)])
        for interface in addresses {
            var arguments = [
                "ip", interface.address.isIPv6 ? "-6" : "-4", "addr", "add", interface.description, "dev", name,
            ]
            if interface.address.isIPv6 { arguments.append("nodad") }
            try self.commands.check(arguments)
        }
        try self.commands.check(["ip", "link", "set", "dev", name, "up"])
    }

    /// Caps the segments the kernel hands a device with offload at `HostNetwork.maxSegmentBytes`, so that each
    /// fits one IP_PACKET frame with its offload header. Best effort: a kernel that cannot set it (before
    /// Linux 5.19) keeps its 64 KiB default, and the few larger segments are dropped and counted.
    public func limitSegments(of name: String) {
        _ = self.commands.run(["ip", "link", "set", "dev", name, "gso_max_size", String(Self.maxSegmentBytes)])
    }

    /// The largest segment a device with offload is given: a frame's payload less the offload header, rounded
    /// down.
    public static let maxSegmentBytes = 65000

    /// Replaces a device's addresses of one family (a reconnect brought a different assignment).
    public func readdress(
        _ name: String,
        from old: TunnelAssignment.Interface,
        to new: TunnelAssignment.Interface
    ) throws(SystemCommand.Failure) {
        let family = new.address.isIPv6 ? "-6" : "-4"
        _ = self.commands.run(["ip", family, "addr", "del", old.description, "dev", name])
        var arguments = ["ip", family, "addr", "add", new.description, "dev", name]
        if new.address.isIPv6 { arguments.append("nodad") }
        try self.commands.check(arguments)
    }

    /// Adds a route and records its removal. A route that exists already is left alone (and not removed
    /// later: it was not ours).
    public func addRoute(
        _ destination: String,
        ipv6: Bool,
        type: String? = nil,
        arguments: [String],
        journal: HostChangeJournal
    ) throws(SystemCommand.Failure) {
        let family = ipv6 ? "-6" : "-4"
        let route = (type.map { [$0] } ?? []) + [destination] + arguments
        let add = ["ip", family, "route", "add"] + route
        let result = self.commands.run(add)
        if !result.succeeded {
            if result.output.contains("File exists") { return }
            throw SystemCommand.Failure(command: add, result: result)
        }
        journal.record(.command(["ip", family, "route", "del"] + route))
    }

    /// Adds a route along `path` (the way the host reached it before the tunnel took the default route).
    public func addRoute(
        _ destination: String,
        ipv6: Bool,
        along path: Path,
        journal: HostChangeJournal
    ) throws(SystemCommand.Failure) {
        try self.addRoute(destination, ipv6: ipv6, arguments: path.routeArguments, journal: journal)
    }

    /// Loads an nftables ruleset that creates table `family name`, after deleting a stale one, and records
    /// the table's removal.
    public func installTable(
        family: String,
        name: String,
        ruleset: String,
        journal: HostChangeJournal?
    ) throws(SystemCommand.Failure) {
        _ = self.commands.run(["nft", "delete", "table", family, name])
        try self.commands.check(["nft", "-f", "-"], input: ruleset)
        journal?.record(.command(["nft", "delete", "table", family, name]))
    }

    /// Reads a sysctl (`net.ipv4.ip_forward`) from /proc/sys.
    public static func sysctl(_ key: String) -> String? {
        let path = "/proc/sys/" + key.replacingDots()
        return HostChangeJournal.readFile(path).map { String(decoding: $0, as: UTF8.self).trimmingWhitespace() }
    }

    /// Sets a sysctl; records the old value (when `journal` is given and the value changes).
    public static func setSysctl(_ key: String, _ value: String, journal: HostChangeJournal?) -> Bool {
        let path = "/proc/sys/" + key.replacingDots()
        let old = Self.sysctl(key)
        if old == value { return true }
        guard HostChangeJournal.writeFile(path, Array((value + "\n").utf8), mode: 0o644, create: false) else {
            return false
        }
        if let old, let journal {
            journal.record(
                .restoreFile(path: path, original: Array((old + "\n").utf8), written: Array((value + "\n").utf8))
            )
        }
        return true
    }

    // MARK: - Resolver

    /// Points the system resolver (/etc/resolv.conf) at `servers`, keeping its `search` and `options`
    /// lines, and records how to put the old file (or symbolic link) back.
    public func pointResolver(at servers: [IPAddress], journal: HostChangeJournal) -> String? {
        let path = self.resolverPath
        var info = stat()
        let exists = lstat(path, &info) == 0
        let isLink = exists && (info.st_mode & S_IFMT) == S_IFLNK
        let original = HostChangeJournal.readFile(path) ?? []
        let written = Array(ResolverFile.rewrite(String(decoding: original, as: UTF8.self), servers: servers).utf8)
        if isLink {
            var target = [CChar](repeating: 0, count: 4096)
            let n = readlink(path, &target, target.count - 1)
            guard n > 0 else { return "cannot read the link \(path): \(String(cString: strerror(errno)))" }
            let destination = String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            // A link (systemd-resolved, resolvconf) is replaced by a file of ours, and comes back on exit.
            journal.record(.restoreSymlink(path: path, target: destination, written: written))
            unlink(path)
            guard HostChangeJournal.writeFile(path, written, mode: 0o644, create: true) else {
                return "cannot write \(path): \(String(cString: strerror(errno)))"
            }
        } else if exists {
            journal.record(.restoreFile(path: path, original: original, written: written))
            // In place: /etc/resolv.conf may be a bind mount (ip netns exec, containers).
            guard HostChangeJournal.writeFile(path, written, mode: 0o644, create: false) else {
                return "cannot write \(path): \(String(cString: strerror(errno)))"
            }
        } else {
            journal.record(.removeFile(path: path, written: written))
            guard HostChangeJournal.writeFile(path, written, mode: 0o644, create: true) else {
                return "cannot write \(path): \(String(cString: strerror(errno)))"
            }
        }
        return nil
    }
}

/// The resolver file full-tunnel mode writes.
public enum ResolverFile {
    /// The new /etc/resolv.conf: `servers` as the only name servers, the old `search`/`domain`/`options`
    /// lines kept.
    public static func rewrite(_ original: String, servers: [IPAddress]) -> String {
        var lines = [
            "# Written by tunnel-client --full-tunnel: DNS goes through the tunnel.",
            "# The previous file comes back when tunnel-client exits.",
        ]
        for server in servers { lines.append("nameserver \(server)") }
        for line in original.split(separator: "\n") {
            let trimmed = line.drop { $0 == " " || $0 == "\t" }
            if trimmed.hasPrefix("search") || trimmed.hasPrefix("domain") || trimmed.hasPrefix("options") {
                lines.append(String(trimmed))
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The `nameserver` addresses of a resolv.conf.
    public static func nameservers(in text: String) -> [IPAddress] {
        text.split(separator: "\n").compactMap { line -> IPAddress? in
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard words.count >= 2, words[0] == "nameserver" else { return nil }
            // Drop a zone index (fe80::1%eth0): a forwarder cannot use it portably.
            let address = words[1].split(separator: "%").first.map(String.init) ?? ""
            return IPAddress.parse(address)
        }
    }
}

extension String {
    func replacingDots() -> String {
        String(self.map { $0 == "." ? "/" : $0 })
    }
}
