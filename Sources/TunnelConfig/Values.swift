import TunnelCrypto
import TunnelProtocol

/// `HOST:PORT`, with IPv6 hosts in brackets (`[::1]:1080`).
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses `HOST:PORT`; `nil` with a reason in `error` otherwise.
    public static func parse(_ text: String) -> Result<Endpoint, ConfigProblem> {
        let bad = ConfigProblem("'\(text)' is not HOST:PORT (IPv6 as [ADDR]:PORT)")
        var host: Substring
        var portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return .failure(bad) }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { return .failure(bad) }
            portText = rest.dropFirst()
            guard IPAddress.parse(String(host))?.isIPv6 == true else { return .failure(bad) }
        } else {
            guard let colon = text.lastIndex(of: ":") else { return .failure(bad) }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            guard !host.contains(":") else { return .failure(bad) }
        }
        guard !host.isEmpty, let port = Int(portText), (0...65535).contains(port), !portText.hasPrefix("+") else {
            return .failure(bad)
        }
        return .success(Endpoint(host: String(host), port: port))
    }

    public var description: String {
        self.host.contains(":") ? "[\(self.host)]:\(self.port)" : "\(self.host):\(self.port)"
    }
}

extension CIDR {
    /// Parses every entry of a list; `origin` names the setting or flag in the error.
    public static func parseList(_ list: [String], origin: String) throws(ConfigError) -> [CIDR] {
        var prefixes: [CIDR] = []
        for text in list {
            guard let cidr = CIDR.parse(text) else {
                throw ConfigError("\(origin): '\(text)' is not an address or CIDR prefix")
            }
            prefixes.append(cidr)
        }
        return prefixes
    }
}

/// A length of time from a config value: `"10s"`, `"500ms"`, `"2m"`, `"1h"`, or an integer of seconds.
public enum DurationParser {
    /// The longest duration a setting may have (a year, in nanoseconds): far beyond any sensible timeout, and
    /// far from where adding it to a clock could overflow.
    public static let longest: Int64 = 366 * 86_400 * 1_000_000_000

    /// `value * scale` in nanoseconds, or nil beyond `longest` (never a trap on overflow).
    public static func scaled(_ value: Int64, by scale: Int64) -> Int64? {
        let (product, overflow) = value.multipliedReportingOverflow(by: scale)
        return overflow || product > Self.longest ? nil : product
    }

    public static func parse(_ text: String) -> Int64? {
        let units: [(String, Int64)] = [
            ("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000),
        ]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            let number = text.dropLast(suffix.count)
            if suffix == "s" && number.hasSuffix("m") { continue }
            if let whole = Int64(number), whole >= 0 { return Self.scaled(whole, by: scale) }
            if let value = Double(number), value >= 0, value * Double(scale) < Double(Self.longest) {
                return Int64(value * Double(scale))
            }
            return nil
        }
        if let seconds = Int64(text), seconds >= 0 { return Self.scaled(seconds, by: 1_000_000_000) }
        return nil
    }
}

/// One problem with a setting, before it is tied to a file or flag.
public struct ConfigProblem: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { self.message }
}

/// A configuration error ready for the user: names the file (and line) or the flag, and the problem.
public struct ConfigError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { self.message }
}

/// Which event loop carries a program's sockets (README, *Performance*): `event_loop`, `--event-loop`.
public enum EventLoopKind: String, Sendable, Equatable, CaseIterable {
    /// SwiftNIO's (NIOPosix): every feature.
    case nio
    /// Our own epoll loop under the same handlers (the default): everything but the full tunnel, for now.
    case epoll

    public static func parse(_ text: String, origin: String) throws(ConfigError) -> EventLoopKind {
        try Self.choice(text, origin: origin)
    }
}

extension CaseIterable where Self: RawRepresentable, Self.RawValue == String {
    /// The case named `text`, or an error that lists the names (`origin`: the option or config key).
    static func choice(_ text: String, origin: String) throws(ConfigError) -> Self {
        guard let value = Self(rawValue: text) else {
            let names = Self.allCases.map(\.rawValue).joined(separator: ", ")
            throw ConfigError("\(origin): '\(text)' is not one of \(names)")
        }
        return value
    }
}
