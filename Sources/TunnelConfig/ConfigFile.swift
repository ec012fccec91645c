import TunnelCrypto

/// A parsed configuration file with typed accessors. Each accessor marks its key as known; `finish()` then
/// rejects any key nobody asked for, so a typo is an error instead of a silently ignored setting.
public struct ConfigFile {
    public let path: String
    private let entries: [String: ConfigEntry]
    private var known: Set<String> = []

    public init(path: String, text: String) throws(ConfigError) {
        self.path = path
        do {
            self.entries = try TOMLParser.parse(text)
        } catch {
            throw ConfigError("\(path): \(error)")
        }
    }

    /// Reads and parses `path`.
    public static func load(_ path: String) throws(ConfigError) -> ConfigFile {
        switch readTextFile(path) {
        case .success(let text): return try ConfigFile(path: path, text: text)
        case .failure(let problem): throw ConfigError("\(path): \(problem.message)")
        }
    }

    private func fail(_ key: String, _ message: String) -> ConfigError {
        ConfigError("\(self.location(key)) \(message)")
    }

    /// `FILE: line N: 'key'` (without the line when the file does not set it), to start a message about a setting.
    public func location(_ key: String) -> String {
        guard let line = self.entries[key]?.line else { return "\(self.path): '\(key)'" }
        return "\(self.path): line \(line): '\(key)'"
    }

    private mutating func raw(_ key: String) -> ConfigEntry? {
        self.known.insert(key)
        return self.entries[key]
    }

    public mutating func string(_ key: String) throws(ConfigError) -> String? {
        guard let entry = self.raw(key) else { return nil }
        guard case .string(let s) = entry.value else {
            throw self.fail(key, "must be a string, not \(entry.value.typeName)")
        }
        return s
    }

    public mutating func integer(_ key: String, range: ClosedRange<Int>) throws(ConfigError) -> Int? {
        guard let entry = self.raw(key) else { return nil }
        guard case .integer(let v) = entry.value else {
            throw self.fail(key, "must be an integer, not \(entry.value.typeName)")
        }
        guard range.contains(v) else {
            throw self.fail(key, "must be between \(range.lowerBound) and \(range.upperBound)")
        }
        return v
    }

    public mutating func boolean(_ key: String) throws(ConfigError) -> Bool? {
        guard let entry = self.raw(key) else { return nil }
        guard case .boolean(let v) = entry.value else {
            throw self.fail(key, "must be true or false, not \(entry.value.typeName)")
        }
        return v
    }

    public mutating func strings(_ key: String) throws(ConfigError) -> [String]? {
        guard let entry = self.raw(key) else { return nil }
        guard case .array(let items) = entry.value else { throw self.fail(key, "must be an array of strings") }
        var out: [String] = []
        for item in items {
            guard case .string(let s) = item else { throw self.fail(key, "must be an array of strings") }
            out.append(s)
        }
        return out
    }

    /// A duration: `"10s"`, `"250ms"`, `"2m"` or whole seconds. Returns nanoseconds.
    public mutating func duration(_ key: String, min: Int64 = 0) throws(ConfigError) -> Int64? {
        guard let entry = self.raw(key) else { return nil }
        let nanos: Int64?
        switch entry.value {
        case .integer(let seconds):
            nanos = seconds >= 0 ? DurationParser.scaled(Int64(seconds), by: 1_000_000_000) : nil
        case .string(let text): nanos = DurationParser.parse(text)
        default: nanos = nil
        }
        guard let nanos, nanos >= min else {
            throw self.fail(key, "must be a duration such as \"10s\" or \"500ms\", of at most a year")
        }
        return nanos
    }

    public mutating func endpoint(_ key: String) throws(ConfigError) -> Endpoint? {
        guard let text = try self.string(key) else { return nil }
        switch Endpoint.parse(text) {
        case .success(let e): return e
        case .failure(let problem): throw self.fail(key, problem.message)
        }
    }

    public mutating func byteSize(_ key: String, range: ClosedRange<Int>) throws(ConfigError) -> Int? {
        guard let entry = self.raw(key) else { return nil }
        let value: Int?
        switch entry.value {
        case .integer(let v): value = v
        case .string(let text): value = ByteSizeParser.parse(text)
        default: value = nil
        }
        guard let value else { throw self.fail(key, "must be a size such as \"256KiB\" or a number of bytes") }
        guard range.contains(value) else {
            throw self.fail(key, "must be between \(range.lowerBound) and \(range.upperBound) bytes")
        }
        return value
    }

    /// Rejects keys that no accessor asked for.
    public func finish() throws(ConfigError) {
        let unknown = Set(self.entries.keys).subtracting(self.known)
        guard let first = unknown.min(by: { (self.entries[$0]!.line, $0) < (self.entries[$1]!.line, $1) }) else {
            return
        }
        throw ConfigError("\(self.path): line \(self.entries[first]!.line): unknown setting '\(first)'")
    }
}

/// Sizes: `"256KiB"`, `"4MiB"`, `"1GiB"`, `"512"` (bytes).
public enum ByteSizeParser {
    public static func parse(_ text: String) -> Int? {
        let units: [(String, Int)] = [
            ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30),
            ("B", 1),
        ]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let v = Int(text.dropLast(suffix.count).trimmingSpaces()), v >= 0 else { return nil }
            let (product, overflow) = v.multipliedReportingOverflow(by: scale)
            return overflow ? nil : product
        }
        return Int(text)
    }
}
