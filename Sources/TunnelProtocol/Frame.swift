import NIOCore

/// A mux frame type (docs/PROTOCOL.md §3.3). Unknown types at or above `firstExtension` are ignored; unknown types
/// below it are a protocol error.
public struct FrameType: Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// Stream bytes; `FIN` half-closes after them. Flow-controlled.
    public static let data = FrameType(rawValue: 0x00)
    /// Opens a stream: kind, the opener's receive window, destination.
    public static let open = FrameType(rawValue: 0x01)
    /// Answers `open`: a SOCKS5 reply code, the acceptor's receive window, the bound address.
    public static let openResult = FrameType(rawValue: 0x02)
    /// Returns receive credit for a stream, or for the connection on stream 0.
    public static let windowUpdate = FrameType(rawValue: 0x03)
    /// Aborts a stream in both directions.
    public static let reset = FrameType(rawValue: 0x04)
    /// No new streams; open ones may finish.
    public static let goAway = FrameType(rawValue: 0x05)
    /// Keepalive and RTT probe; answered with the same 8 bytes and `ACK`.
    public static let ping = FrameType(rawValue: 0x06)
    /// One UDP datagram of an association (SOCKS5 UDP ASSOCIATE). Not flow-controlled.
    public static let datagram = FrameType(rawValue: 0x07)
    /// One IP packet (full-tunnel mode), stream 0. Not flow-controlled.
    public static let ipPacket = FrameType(rawValue: 0x08)
    /// Settings and assignments after key confirmation (TLVs).
    public static let control = FrameType(rawValue: 0x09)
    /// The sender rekeys its sending direction after this record. Last frame of its record.
    public static let rekey = FrameType(rawValue: 0x0A)
    /// Authenticated end of the connection. Last frame sent.
    public static let close = FrameType(rawValue: 0x0B)
    /// Ignored filler.
    public static let padding = FrameType(rawValue: 0x0C)
    /// Session resumption (docs/PROTOCOL.md §7.1): the sender has processed the peer's records 1 ... count.
    public static let received = FrameType(rawValue: 0x0D)
    /// Session resumption (§7.3): the client's request to carry a session on over this connection.
    public static let resume = FrameType(rawValue: 0x0E)
    /// Session resumption (§7.3): the server's answer to RESUME.
    public static let resumed = FrameType(rawValue: 0x0F)

    /// Types from here on are extensions a receiver may ignore.
    public static let firstExtension: UInt8 = 0x40

    public var description: String {
        switch self {
        case .data: "DATA"
        case .open: "OPEN"
        case .openResult: "OPEN_RESULT"
        case .windowUpdate: "WINDOW_UPDATE"
        case .reset: "RESET"
        case .goAway: "GOAWAY"
        case .ping: "PING"
        case .datagram: "DATAGRAM"
        case .ipPacket: "IP_PACKET"
        case .control: "CONTROL"
        case .rekey: "REKEY"
        case .close: "CLOSE"
        case .padding: "PADDING"
        case .received: "RECEIVED"
        case .resume: "RESUME"
        case .resumed: "RESUMED"
        default: "type(0x\(String(self.rawValue, radix: 16)))"
        }
    }
}

/// Frame flag bits. Unknown bits are ignored.
public struct FrameFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// On DATA: the sender will send nothing more on this stream (half-close).
    public static let fin = FrameFlags(rawValue: 0x01)
    /// On PING: this is the answer.
    public static let ack = FrameFlags(rawValue: 0x02)
    /// On DATA: the payload is `u16 original length ‖ raw deflate` ending in a sync flush (negotiated; docs/PROTOCOL.md §4).
    public static let compressed = FrameFlags(rawValue: 0x04)
    /// On a compressed DATA frame: the sender's deflate context starts afresh here (the receiver starts a new
    /// inflate context too).
    public static let compressionStart = FrameFlags(rawValue: 0x08)
}

/// A stream identifier. Client-opened streams are odd, server-opened even, 0 is the connection itself.
public struct StreamID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    /// The connection as a whole (connection window, PING, GOAWAY, IP packets).
    public static let connection = StreamID(0)
    public var isClientInitiated: Bool { self.rawValue & 1 == 1 }
    public static func < (lhs: StreamID, rhs: StreamID) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { String(self.rawValue) }
}

/// The fixed 8-byte header in front of every frame:
///
///     type u8 | flags u8 | stream_id u32 BE | length u16 BE | payload[length]
public struct FrameHeader: Hashable, Sendable {
    /// Header size on the wire.
    public static let byteCount = 8

    public var type: FrameType
    public var flags: FrameFlags
    public var streamID: StreamID
    public var length: Int

    public init(type: FrameType, flags: FrameFlags = [], streamID: StreamID, length: Int) {
        self.type = type
        self.flags = flags
        self.streamID = streamID
        self.length = length
    }
}

/// One frame read from a record: its header and a slice of the record holding its payload. (A named struct
/// rather than a tuple: an optional tuple goes through the runtime's generic value witnesses on every frame.)
public struct DecodedFrame: Sendable {
    public var header: FrameHeader
    public var payload: ByteBuffer

    @inlinable
    public init(header: FrameHeader, payload: ByteBuffer) {
        self.header = header
        self.payload = payload
    }
}

/// Limits of the record layer and the frame layer.
public enum WireLimits {
    /// Largest Noise message (Noise §3): the u16 length prefix.
    public static let maxRecordCiphertext = 65535
    /// Largest plaintext in one record (ciphertext minus the 16-byte tag).
    public static let maxRecordPlaintext = 65535 - 16
    /// Smallest legal record: a tag alone.
    public static let minRecordCiphertext = 16
    /// Largest payload one frame can carry inside a record.
    public static let maxFramePayload = maxRecordPlaintext - FrameHeader.byteCount
    /// Most frame bytes a sender puts in one record: the rest is kept for the REKEY frame a record may end with.
    public static let maxRecordFrameBytes = maxRecordPlaintext - FrameHeader.byteCount
    /// Largest payload of a frame that must go out whole in one record (a datagram, an IP packet, a CONTROL
    /// frame): it must fit an empty record's `maxRecordFrameBytes`. Anything larger could never be sent, and
    /// would block every frame queued behind it.
    public static let maxUnsplitFramePayload = maxRecordFrameBytes - FrameHeader.byteCount
    /// With early data: what the opener of a TCP stream may send before its OPEN_RESULT. The acceptor's initial
    /// window for a TCP stream is never smaller, and the window in its OPEN_RESULT counts these bytes as sent.
    public static let earlyDataWindow = 64 << 10
}

extension ByteBuffer {
    /// Writes a frame header; returns the index of its length field (so a DATA frame can be extended in place).
    @inlinable
    @discardableResult
    public mutating func writeFrameHeader(_ header: FrameHeader) -> Int {
        precondition(header.length >= 0 && header.length <= WireLimits.maxFramePayload)
        self.writeInteger(header.type.rawValue)
        self.writeInteger(header.flags.rawValue)
        self.writeInteger(header.streamID.rawValue)
        let lengthIndex = self.writerIndex
        self.writeInteger(UInt16(header.length))
        return lengthIndex
    }

    /// Reads one frame from a decrypted record. `nil` when the record is used up.
    ///
    /// A record holds whole frames only, so a partial header or payload is a protocol error, never a "wait".
    @inlinable
    public mutating func readFrame() throws(ProtocolError) -> DecodedFrame? {
        guard self.readableBytes > 0 else { return nil }
        guard self.readableBytes >= FrameHeader.byteCount else {
            throw ProtocolError.malformedFrame("\(self.readableBytes) trailing bytes are not a frame header")
        }
        let type = self.readInteger(as: UInt8.self)!
        let flags = self.readInteger(as: UInt8.self)!
        let stream = self.readInteger(as: UInt32.self)!
        let length = Int(self.readInteger(as: UInt16.self)!)
        guard let payload = self.readSlice(length: length) else {
            throw ProtocolError.malformedFrame(
                "frame \(FrameType(rawValue: type)) declares \(length) bytes, record has \(self.readableBytes)"
            )
        }
        return DecodedFrame(
            header: FrameHeader(
                type: FrameType(rawValue: type),
                flags: FrameFlags(rawValue: flags),
                streamID: StreamID(stream),
                length: length
            ),
            payload: payload
        )
    }
}
