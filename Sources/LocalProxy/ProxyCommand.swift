import TunnelCrypto
import TunnelProtocol

/// What an application asked its local proxy for, whichever protocol it spoke.
public enum ProxyCommand: Equatable, Sendable {
    /// A TCP connection to the target (SOCKS5/SOCKS4 CONNECT, HTTP CONNECT, or a plain HTTP request's host).
    case connect(TargetAddress)
    /// A UDP relay (SOCKS5 UDP ASSOCIATE). The address is where the application says its datagrams will come
    /// from; all zeros means "not known yet".
    case udpAssociate(TargetAddress)
}

/// The username and password the local proxy requires (RFC 1929, SOCKS4 user id, HTTP Basic).
public struct ProxyCredentials: Sendable {
    public let username: [UInt8]
    public let password: [UInt8]

    public init(username: String, password: String) {
        self.username = Array(username.utf8)
        self.password = Array(password.utf8)
    }

    /// Whether the offered pair matches, in constant time.
    public func matches(username: [UInt8], password: [UInt8]) -> Bool {
        // Both comparisons always run: no early exit reveals which part was wrong.
        let userOK = constantTimeEqual(username, self.username)
        let passOK = constantTimeEqual(password, self.password)
        return userOK && passOK
    }

    /// Whether a SOCKS4 user id carries both parts as `USERNAME:PASSWORD`, in constant time. SOCKS4 has no
    /// password field (only a user id), so a user id that is only the name is refused: it would let anyone
    /// who knows the name in without the password.
    public func matches(userID: [UInt8]) -> Bool {
        constantTimeEqual(userID, self.username + [UInt8(ascii: ":")] + self.password)
    }
}

/// The protocol an application speaks, told apart by its first byte.
public enum LocalProxyProtocol: Equatable, Sendable {
    case socks5
    case socks4
    case http

    /// `nil` when the byte starts none of them (the connection is closed).
    public static func detect(firstByte: UInt8) -> LocalProxyProtocol? {
        switch firstByte {
        case 0x05: return .socks5
        case 0x04: return .socks4
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): return .http  // an HTTP method token
        default: return nil
        }
    }
}
