import NIOCore
import TunnelProtocol

/// SOCKS5 wire constants (RFC 1928).
public enum SOCKS5 {
    /// Protocol version byte.
    public static let version: UInt8 = 0x05

    /// An authentication method code (RFC 1928 §3).
    public struct Method: Hashable, Sendable {
        public var rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// X'00' no authentication required.
        public static let noAuthentication = Method(rawValue: 0x00)
        /// X'02' username/password (RFC 1929).
        public static let usernamePassword = Method(rawValue: 0x02)
        /// X'FF' no acceptable methods.
        public static let noAcceptable = Method(rawValue: 0xFF)
    }

    /// A request command (RFC 1928 §4).
    public struct Command: Hashable, Sendable, CustomStringConvertible {
        public var rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let connect = Command(rawValue: 0x01)
        public static let bind = Command(rawValue: 0x02)
        public static let udpAssociate = Command(rawValue: 0x03)
        public var description: String {
            switch self {
            case .connect: "CONNECT"
            case .bind: "BIND"
            case .udpAssociate: "UDP ASSOCIATE"
            default: "command 0x\(String(self.rawValue, radix: 16))"
            }
        }
    }

    /// The method-selection message (RFC 1928 §3): `VER METHOD`. The two a handshake answers with are made once
    /// and shared (a ByteBuffer is copy-on-write): each connection would otherwise allocate its own.
    public static func methodSelection(_ method: Method) -> ByteBuffer {
        switch method {
        case .noAuthentication: Self.noAuthenticationSelected
        case .usernamePassword: Self.usernamePasswordSelected
        default: ByteBuffer(bytes: [version, method.rawValue])
        }
    }
    private static let noAuthenticationSelected = ByteBuffer(bytes: [version, Method.noAuthentication.rawValue])
    private static let usernamePasswordSelected = ByteBuffer(bytes: [version, Method.usernamePassword.rawValue])

    /// A reply (RFC 1928 §6): `VER REP RSV ATYP BND.ADDR BND.PORT`. Success with no bound address (a fast-opened
    /// stream's answer) is made once and shared.
    public static func reply(_ code: ReplyCode, bound: TargetAddress = .unspecified) -> ByteBuffer {
        if code == .succeeded && bound == .unspecified { return Self.succeededUnbound }
        return Self.encodeReply(code, bound: bound)
    }
    private static let succeededUnbound = encodeReply(.succeeded, bound: .unspecified)

    private static func encodeReply(_ code: ReplyCode, bound: TargetAddress) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(4 + bound.encodedLength)
        buffer.writeInteger(version)
        buffer.writeInteger(code.rawValue)
        buffer.writeInteger(UInt8(0))
        buffer.writeTargetAddress(bound)
        return buffer
    }
}
