import NIOCore
import TunnelProtocol

/// The server side of a SOCKS5 handshake (RFC 1928), as the client's local listener runs it: method
/// negotiation (no authentication), then one request. Pure: bytes in, actions out.
///
/// Bytes that arrive after the request (a client that pipelines its first data) stay in the caller's buffer
/// for the stream.
public struct SOCKS5ServerStateMachine {
    /// What to do next.
    public enum Action: Equatable {
        /// Wait for more bytes.
        case needMoreData
        /// Send these bytes and keep reading (method selection).
        case send(ByteBuffer)
        /// The request is complete: open a stream to this address, then send `reply(...)`.
        case connect(TargetAddress)
        /// Send this error reply, then close.
        case replyAndClose(ByteBuffer, reason: String)
        /// Close without a reply (the peer does not speak SOCKS5, or sent nonsense).
        case close(reason: String)
    }

    private enum State {
        /// Waiting for `VER NMETHODS METHODS`.
        case awaitingGreeting
        /// Method chosen; waiting for `VER CMD RSV ATYP DST.ADDR DST.PORT`.
        case awaitingRequest
        /// A CONNECT is being served; no more handshake bytes are parsed.
        case requested
        /// Failed; nothing more is parsed.
        case failed
    }

    private var state: State = .awaitingGreeting

    public init() {}

    /// Consumes handshake bytes from `buffer`. Call again while the action is `.send`.
    public mutating func receive(_ buffer: inout ByteBuffer) -> Action {
        switch self.state {
        case .awaitingGreeting:
            return self.parseGreeting(&buffer)
        case .awaitingRequest:
            return self.parseRequest(&buffer)
        case .requested, .failed:
            return .needMoreData
        }
    }

    /// RFC 1928 §3: `VER(1) NMETHODS(1) METHODS(1..255)`.
    private mutating func parseGreeting(_ buffer: inout ByteBuffer) -> Action {
        guard let version = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return .needMoreData }
        guard version == SOCKS5.version else {
            self.state = .failed
            return .close(reason: "not SOCKS5 (first byte 0x\(String(version, radix: 16)))")
        }
        guard let count = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt8.self) else { return .needMoreData }
        guard count > 0 else {
            self.state = .failed
            return .replyAndClose(SOCKS5.methodSelection(.noAcceptable), reason: "greeting offers no methods")
        }
        guard buffer.readableBytes >= 2 + Int(count) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 2)
        let methods = buffer.readBytes(length: Int(count))!
        guard methods.contains(SOCKS5.Method.noAuthentication.rawValue) else {
            self.state = .failed
            return .replyAndClose(SOCKS5.methodSelection(.noAcceptable), reason: "client offers no acceptable method")
        }
        self.state = .awaitingRequest
        return .send(SOCKS5.methodSelection(.noAuthentication))
    }

    /// RFC 1928 §4: `VER(1) CMD(1) RSV(1) ATYP(1) DST.ADDR DST.PORT(2)`.
    private mutating func parseRequest(_ buffer: inout ByteBuffer) -> Action {
        guard buffer.readableBytes >= 4 else { return .needMoreData }
        let start = buffer.readerIndex
        let version = buffer.getInteger(at: start, as: UInt8.self)!
        let command = SOCKS5.Command(rawValue: buffer.getInteger(at: start + 1, as: UInt8.self)!)
        guard version == SOCKS5.version else {
            self.state = .failed
            return .close(reason: "request version 0x\(String(version, radix: 16)) is not SOCKS5")
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
            self.state = .failed
            return .replyAndClose(SOCKS5.reply(.addressTypeNotSupported), reason: "address type 0x\(String(type, radix: 16))")
        } catch {
            self.state = .failed
            return .replyAndClose(SOCKS5.reply(.generalFailure), reason: "invalid domain name")
        }
        guard command == .connect else {
            self.state = .failed
            return .replyAndClose(SOCKS5.reply(.commandNotSupported), reason: "\(command) not supported")
        }
        self.state = .requested
        return .connect(address)
    }
}
