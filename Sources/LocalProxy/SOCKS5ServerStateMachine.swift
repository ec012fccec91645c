import NIOCore
import TunnelProtocol

/// The server side of a SOCKS5 handshake (RFC 1928), as the client's local listener runs it: method
/// negotiation (no authentication, or username/password per RFC 1929 when credentials are set), then one
/// request. Pure: bytes in, actions out.
///
/// Bytes that arrive after the request (a client that pipelines its first data) stay in the caller's buffer
/// for the stream.
public struct SOCKS5ServerStateMachine {
    /// What to do next.
    public enum Action: Equatable {
        /// Wait for more bytes.
        case needMoreData
        /// Send these bytes and keep reading (method selection, authentication success).
        case send(ByteBuffer)
        /// The request is complete: serve it, then send `SOCKS5.reply(...)`.
        case request(ProxyCommand)
        /// Send these bytes, then close.
        case replyAndClose(ByteBuffer, reason: String)
        /// Close without a reply (the peer does not speak SOCKS5, or sent nonsense).
        case close(reason: String)
    }

    private enum State {
        /// Waiting for `VER NMETHODS METHODS`.
        case awaitingGreeting
        /// Username/password chosen; waiting for `VER ULEN UNAME PLEN PASSWD` (RFC 1929 §2).
        case awaitingCredentials
        /// Authenticated (or none needed); waiting for `VER CMD RSV ATYP DST.ADDR DST.PORT`.
        case awaitingRequest
        /// A request is being served; no more handshake bytes are parsed.
        case requested
        /// Failed; nothing more is parsed.
        case failed
    }

    private var state: State = .awaitingGreeting
    private let credentials: ProxyCredentials?

    /// With `credentials`, only username/password is offered (RFC 1929); without, only "no authentication".
    public init(credentials: ProxyCredentials? = nil) {
        self.credentials = credentials
    }

    /// Consumes handshake bytes from `buffer`. Call again while the action is `.send`.
    public mutating func receive(_ buffer: inout ByteBuffer) -> Action {
        switch self.state {
        case .awaitingGreeting: return self.parseGreeting(&buffer)
        case .awaitingCredentials: return self.parseCredentials(&buffer)
        case .awaitingRequest: return self.parseRequest(&buffer)
        case .requested, .failed: return .needMoreData
        }
    }

    private mutating func fail(_ action: Action) -> Action {
        self.state = .failed
        return action
    }

    /// RFC 1928 §3: `VER(1) NMETHODS(1) METHODS(1..255)`.
    private mutating func parseGreeting(_ buffer: inout ByteBuffer) -> Action {
        guard let version = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return .needMoreData }
        guard version == SOCKS5.version else {
            return self.fail(.close(reason: "not SOCKS5 (first byte 0x\(String(version, radix: 16)))"))
        }
        guard let count = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt8.self) else { return .needMoreData }
        guard count > 0 else {
            return self.fail(
                .replyAndClose(SOCKS5.methodSelection(.noAcceptable), reason: "greeting offers no methods")
            )
        }
        guard buffer.readableBytes >= 2 + Int(count) else { return .needMoreData }
        let wanted: SOCKS5.Method = self.credentials == nil ? .noAuthentication : .usernamePassword
        let offered = buffer.readableBytesView.dropFirst(2).prefix(Int(count)).contains(wanted.rawValue)
        buffer.moveReaderIndex(forwardBy: 2 + Int(count))
        guard offered else {
            let why =
                self.credentials == nil
                ? "client offers no acceptable method" : "client does not offer username/password"
            return self.fail(.replyAndClose(SOCKS5.methodSelection(.noAcceptable), reason: why))
        }
        self.state = self.credentials == nil ? .awaitingRequest : .awaitingCredentials
        return .send(SOCKS5.methodSelection(wanted))
    }

    /// RFC 1929 §2: `VER(1)=1 ULEN(1) UNAME(1..255) PLEN(1) PASSWD(1..255)`; answered `VER STATUS`.
    private mutating func parseCredentials(_ buffer: inout ByteBuffer) -> Action {
        let start = buffer.readerIndex
        guard let version = buffer.getInteger(at: start, as: UInt8.self) else { return .needMoreData }
        guard version == 0x01 else {
            return self.fail(
                .replyAndClose(ByteBuffer(bytes: [0x01, 0x01]), reason: "authentication version \(version)")
            )
        }
        guard let userLength = buffer.getInteger(at: start + 1, as: UInt8.self),
            let passLength = buffer.getInteger(at: start + 2 + Int(userLength), as: UInt8.self),
            buffer.readableBytes >= 3 + Int(userLength) + Int(passLength)
        else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 2)
        let user = buffer.readBytes(length: Int(userLength))!
        buffer.moveReaderIndex(forwardBy: 1)
        let pass = buffer.readBytes(length: Int(passLength))!
        guard let credentials = self.credentials, credentials.matches(username: user, password: pass) else {
            return self.fail(.replyAndClose(ByteBuffer(bytes: [0x01, 0x01]), reason: "wrong username or password"))
        }
        self.state = .awaitingRequest
        return .send(ByteBuffer(bytes: [0x01, 0x00]))
    }

    /// RFC 1928 §4: `VER(1) CMD(1) RSV(1) ATYP(1) DST.ADDR DST.PORT(2)`.
    private mutating func parseRequest(_ buffer: inout ByteBuffer) -> Action {
        guard buffer.readableBytes >= 4 else { return .needMoreData }
        let start = buffer.readerIndex
        let version = buffer.getInteger(at: start, as: UInt8.self)!
        let command = SOCKS5.Command(rawValue: buffer.getInteger(at: start + 1, as: UInt8.self)!)
        guard version == SOCKS5.version else {
            return self.fail(.close(reason: "request version 0x\(String(version, radix: 16)) is not SOCKS5"))
        }
        buffer.moveReaderIndex(forwardBy: 3)
        let address: TargetAddress
        do {
            guard let parsed = try buffer.readTargetAddress() else {
                buffer.moveReaderIndex(to: start)
                return .needMoreData
            }
            address = parsed
        } catch .unsupportedAddressType(let type) {
            return self.fail(
                .replyAndClose(
                    SOCKS5.reply(.addressTypeNotSupported),
                    reason: "address type 0x\(String(type, radix: 16))"
                )
            )
        } catch {
            return self.fail(.replyAndClose(SOCKS5.reply(.generalFailure), reason: "invalid domain name"))
        }
        switch command {
        case .connect:
            self.state = .requested
            return .request(.connect(address))
        case .udpAssociate:
            self.state = .requested
            return .request(.udpAssociate(address))
        default:
            return self.fail(.replyAndClose(SOCKS5.reply(.commandNotSupported), reason: "\(command) not supported"))
        }
    }
}
