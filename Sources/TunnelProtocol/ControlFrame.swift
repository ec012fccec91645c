import NIOCore

/// Frames the scheduler sends before any stream data (docs/PROTOCOL.md §3.3, "control frames first").
enum ControlFrame {
    case open(StreamID, kind: StreamKind, window: UInt32, target: TargetAddress)
    case openResult(StreamID, reply: ReplyCode, window: UInt32, bound: TargetAddress)
    case windowUpdate(StreamID, increment: UInt32)
    case reset(StreamID, ErrorCode)
    case goAway(lastStreamID: StreamID, ErrorCode)
    case ping(UInt64, ack: Bool)
    case control(ByteBuffer)

    /// Size on the wire, header included.
    var encodedLength: Int {
        FrameHeader.byteCount + self.payloadLength
    }

    private var payloadLength: Int {
        switch self {
        case .open(_, _, _, let target): return 1 + 4 + target.encodedLength
        case .openResult(_, _, _, let bound): return 1 + 4 + bound.encodedLength
        case .windowUpdate: return 4
        case .reset: return 4
        case .goAway: return 8
        case .ping: return 8
        case .control(let payload): return payload.readableBytes
        }
    }

    /// Appends the frame.
    func write(into buffer: inout ByteBuffer) {
        switch self {
        case .open(let id, let kind, let window, let target):
            buffer.writeFrameHeader(FrameHeader(type: .open, streamID: id, length: self.payloadLength))
            buffer.writeInteger(kind.rawValue)
            buffer.writeInteger(window)
            buffer.writeTargetAddress(target)
        case .openResult(let id, let reply, let window, let bound):
            buffer.writeFrameHeader(FrameHeader(type: .openResult, streamID: id, length: self.payloadLength))
            buffer.writeInteger(reply.rawValue)
            buffer.writeInteger(window)
            buffer.writeTargetAddress(bound)
        case .windowUpdate(let id, let increment):
            buffer.writeFrameHeader(FrameHeader(type: .windowUpdate, streamID: id, length: 4))
            buffer.writeInteger(increment)
        case .reset(let id, let code):
            buffer.writeFrameHeader(FrameHeader(type: .reset, streamID: id, length: 4))
            buffer.writeInteger(code.rawValue)
        case .goAway(let last, let code):
            buffer.writeFrameHeader(FrameHeader(type: .goAway, streamID: .connection, length: 8))
            buffer.writeInteger(last.rawValue)
            buffer.writeInteger(code.rawValue)
        case .ping(let opaque, let ack):
            buffer.writeFrameHeader(FrameHeader(type: .ping, flags: ack ? .ack : [], streamID: .connection, length: 8))
            buffer.writeInteger(opaque)
        case .control(let payload):
            buffer.writeFrameHeader(FrameHeader(type: .control, streamID: .connection, length: payload.readableBytes))
            buffer.writeImmutableBuffer(payload)
        }
    }
}

/// What an OPEN asks for.
public struct StreamKind: Hashable, Sendable {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// A TCP connection to the target (SOCKS5 CONNECT).
    public static let tcp = StreamKind(rawValue: 1)
    /// A UDP association (SOCKS5 UDP ASSOCIATE): carries DATAGRAM frames, no stream data.
    public static let udp = StreamKind(rawValue: 2)
}
