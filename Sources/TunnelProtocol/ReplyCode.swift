/// The outcome of opening a stream, as a SOCKS5 reply code (RFC 1928 §6). OPEN_RESULT carries it, and the
/// client's SOCKS5 listener passes it to the application unchanged.
public struct ReplyCode: Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// X'00' succeeded.
    public static let succeeded = ReplyCode(rawValue: 0x00)
    /// X'01' general SOCKS server failure.
    public static let generalFailure = ReplyCode(rawValue: 0x01)
    /// X'02' connection not allowed by ruleset.
    public static let notAllowed = ReplyCode(rawValue: 0x02)
    /// X'03' network unreachable.
    public static let networkUnreachable = ReplyCode(rawValue: 0x03)
    /// X'04' host unreachable (also: the name does not resolve).
    public static let hostUnreachable = ReplyCode(rawValue: 0x04)
    /// X'05' connection refused.
    public static let connectionRefused = ReplyCode(rawValue: 0x05)
    /// X'06' TTL expired (used for: the connect timed out).
    public static let ttlExpired = ReplyCode(rawValue: 0x06)
    /// X'07' command not supported.
    public static let commandNotSupported = ReplyCode(rawValue: 0x07)
    /// X'08' address type not supported.
    public static let addressTypeNotSupported = ReplyCode(rawValue: 0x08)

    public var description: String {
        switch self {
        case .succeeded: "succeeded"
        case .generalFailure: "general failure"
        case .notAllowed: "not allowed by ruleset"
        case .networkUnreachable: "network unreachable"
        case .hostUnreachable: "host unreachable"
        case .connectionRefused: "connection refused"
        case .ttlExpired: "timed out"
        case .commandNotSupported: "command not supported"
        case .addressTypeNotSupported: "address type not supported"
        default: "reply 0x\(String(self.rawValue, radix: 16))"
        }
    }
}
