/// The log levels accepted by `--log-level` and `log_level` (swift-log's names).
public enum LogLevelName {
    public static let all = ["trace", "debug", "info", "notice", "warning", "error", "critical"]

    public static func validate(_ name: String, origin: String) throws(ConfigError) -> String {
        let lowered = name.lowercased()
        guard all.contains(lowered) else {
            throw ConfigError("\(origin): unknown log level '\(name)' (one of: \(all.joined(separator: ", ")))")
        }
        return lowered
    }
}

/// The log line formats accepted by `--log-format` and `log_format`.
public enum LogFormatName {
    public static let all = ["text", "json"]

    public static func validate(_ name: String, origin: String) throws(ConfigError) -> String {
        let lowered = name.lowercased()
        guard all.contains(lowered) else {
            throw ConfigError("\(origin): unknown log format '\(name)' (text or json)")
        }
        return lowered
    }
}
