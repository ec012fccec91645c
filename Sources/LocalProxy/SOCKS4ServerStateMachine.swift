import NIOCore
import TunnelProtocol

/// SOCKS4 and SOCKS4a wire format (the 1990s NEC protocol note; 4a adds names).
public enum SOCKS4 {
    public static let version: UInt8 = 0x04
    /// CD in a reply: request granted.
    public static let granted: UInt8 = 0x5A
    /// CD in a reply: request rejected or failed.
    public static let rejected: UInt8 = 0x5B

    /// `VN=0 CD DSTPORT DSTIP`: the bound address when it is IPv4, zeros otherwise.
    public static func reply(_ reply: ReplyCode, bound: TargetAddress = .unspecified) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt8(0))
        buffer.writeInteger(reply == .succeeded ? granted : rejected)
        if case .ipv4(let address) = bound.host, reply == .succeeded {
            buffer.writeInteger(bound.port)
            buffer.writeInteger(address)
        } else {
            buffer.writeRepeatingByte(0, count: 6)
        }
        return buffer
    }
}

/// The server side of a SOCKS4/SOCKS4a request: `VN=4 CD DSTPORT DSTIP USERID NUL [HOST NUL]`, where a DSTIP
/// of 0.0.0.x (x ≠ 0) means a name follows (4a). Only CONNECT is served. With credentials set, the user id
/// must equal the username; otherwise it is ignored.
public struct SOCKS4ServerStateMachine {
    public enum Action: Equatable {
        case needMoreData
        /// The request is complete: serve it, then send `SOCKS4.reply(...)`.
        case request(ProxyCommand)
        case replyAndClose(ByteBuffer, reason: String)
        case close(reason: String)
    }

    /// Longest user id or name accepted (each ends at a NUL).
    static let maxField = 255

    private var done = false
    private let credentials: ProxyCredentials?

    public init(credentials: ProxyCredentials? = nil) {
        self.credentials = credentials
    }

    public mutating func receive(_ buffer: inout ByteBuffer) -> Action {
        guard !self.done else { return .needMoreData }
        let start = buffer.readerIndex
        guard buffer.readableBytes >= 8 else { return .needMoreData }
        let version = buffer.getInteger(at: start, as: UInt8.self)!
        let command = buffer.getInteger(at: start + 1, as: UInt8.self)!
        let port = buffer.getInteger(at: start + 2, as: UInt16.self)!
        let ip = buffer.getInteger(at: start + 4, as: UInt32.self)!
        guard version == SOCKS4.version else {
            self.done = true
            return .close(reason: "not SOCKS4")
        }
        guard let userEnd = Self.nul(in: buffer, from: start + 8) else {
            if buffer.readableBytes > 8 + Self.maxField {
                self.done = true
                return .replyAndClose(SOCKS4.reply(.generalFailure), reason: "SOCKS4 user id too long")
            }
            return .needMoreData
        }
        let userID = buffer.getBytes(at: start + 8, length: userEnd - (start + 8))!
        var end = userEnd + 1
        var host = TargetAddress.Host.ipv4(ip)
        if ip != 0 && ip < 256 {
            // SOCKS4a: a name follows the user id.
            guard let nameEnd = Self.nul(in: buffer, from: end) else {
                if buffer.readableBytes > (end - start) + Self.maxField {
                    self.done = true
                    return .replyAndClose(SOCKS4.reply(.generalFailure), reason: "SOCKS4a name too long")
                }
                return .needMoreData
            }
            let name = buffer.getBytes(at: end, length: nameEnd - end)!
            guard !name.isEmpty, let text = String(validating: name, as: UTF8.self) else {
                self.done = true
                return .replyAndClose(SOCKS4.reply(.generalFailure), reason: "invalid SOCKS4a name")
            }
            host = .domain(text)
            end = nameEnd + 1
        }
        buffer.moveReaderIndex(to: end)
        self.done = true
        if let credentials = self.credentials, !credentials.matches(userID: userID) {
            return .replyAndClose(SOCKS4.reply(.notAllowed), reason: "SOCKS4 user id does not match")
        }
        guard command == 0x01 else {
            return .replyAndClose(SOCKS4.reply(.commandNotSupported), reason: "SOCKS4 command \(command) not supported")
        }
        return .request(.connect(TargetAddress(host: host, port: port)))
    }

    /// Index of the first NUL at or after `from` within the field limit, if it has arrived.
    private static func nul(in buffer: ByteBuffer, from: Int) -> Int? {
        let available = buffer.writerIndex - from
        guard available > 0 else { return nil }
        let view = buffer.viewBytes(at: from, length: min(available, maxField + 1))!
        return view.firstIndex(of: 0)
    }
}
