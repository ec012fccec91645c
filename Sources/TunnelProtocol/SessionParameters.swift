import NIOCore
import TunnelCrypto

/// Optional capabilities, as a bit set carried in the handshake.
public struct SessionFeatures: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Per-stream deflate of DATA frames (docs/PROTOCOL.md §4).
    public static let compression = SessionFeatures(rawValue: 1 << 0)
    /// IP packets over the tunnel (docs/PROTOCOL.md §5).
    public static let fullTunnel = SessionFeatures(rawValue: 1 << 1)
    /// DATAGRAM frames spend their UDP stream's window and the receiver returns it once it has handled them
    /// (docs/PROTOCOL.md §3.3), so a datagram flood cannot pile up ahead of the WINDOW_UPDATEs that other
    /// streams wait for.
    public static let datagramCredit = SessionFeatures(rawValue: 1 << 2)
    /// Every IP_PACKET frame starts with a `PacketOffloadHeader`: TCP segments of up to 64 KiB cross the
    /// tunnel whole (docs/PROTOCOL.md §5.1). Offered by an end whose TUN device can read and write them.
    public static let packetOffload = SessionFeatures(rawValue: 1 << 3)
    /// The opener of a TCP stream may send DATA (and FIN) before its OPEN_RESULT, up to
    /// `WireLimits.earlyDataWindow` bytes; the acceptor holds them until the stream is open (docs/PROTOCOL.md
    /// §3.3, *Early data*). Lets the client answer an application at once and send its first bytes with the open.
    public static let earlyData = SessionFeatures(rawValue: 1 << 4)
    /// Records are numbered and kept until acknowledged, so that a session can go on over a new connection
    /// (docs/PROTOCOL.md §7).
    public static let resumption = SessionFeatures(rawValue: 1 << 5)
}

/// What one side announces in its handshake payload: its limits and receive windows.
///
/// Encoded as TLVs (`type u8, length u16 BE, value`); unknown types are skipped so later versions can add
/// fields, and a missing field takes its default (so a bare Noise peer with an empty payload interoperates).
public struct SessionParameters: Hashable, Sendable {
    /// Protocol minor version (the major version is in the Noise prologue).
    public var minorVersion: UInt8 = 0
    /// Requested (client) or accepted (server) features.
    public var features: SessionFeatures = []
    /// Most concurrent streams the sender accepts being opened by its peer.
    public var maxConcurrentStreams: UInt32 = 16384
    /// The sender's connection-level receive window: the peer's initial connection send credit.
    public var connectionWindow: UInt32 = 16 << 20
    /// Server, with resumption granted: the id a later connection names this session by (docs/PROTOCOL.md
    /// §7.2), 16 random bytes.
    public var sessionID: [UInt8]? = nil

    public init() {}

    enum Tag {
        static let minorVersion: UInt8 = 0x01
        static let features: UInt8 = 0x02
        static let maxConcurrentStreams: UInt8 = 0x03
        static let connectionWindow: UInt8 = 0x05
        static let sessionID: UInt8 = 0x06
    }

    /// Appends the TLVs.
    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeTLV(Tag.minorVersion) { $0.writeInteger(self.minorVersion) }
        buffer.writeTLV(Tag.features) { $0.writeInteger(self.features.rawValue) }
        buffer.writeTLV(Tag.maxConcurrentStreams) { $0.writeInteger(self.maxConcurrentStreams) }
        buffer.writeTLV(Tag.connectionWindow) { $0.writeInteger(self.connectionWindow) }
        if let id = self.sessionID { buffer.writeTLV(Tag.sessionID) { $0.writeBytes(id) } }
    }

    /// Parses TLVs; unknown tags are skipped, known tags must have their exact size.
    public static func decode(_ buffer: inout ByteBuffer) throws(ProtocolError) -> SessionParameters {
        var parameters = SessionParameters()
        while let (tag, field) = try buffer.readTLV(
            malformed: ProtocolError.handshakeFailed("truncated handshake parameter")
        ) {
            var value = field
            func exact<T: FixedWidthInteger>(_: T.Type) throws(ProtocolError) -> T {
                guard value.readableBytes == MemoryLayout<T>.size, let v = value.readInteger(as: T.self) else {
                    throw ProtocolError.handshakeFailed("handshake parameter \(tag) has length \(field.readableBytes)")
                }
                return v
            }
            switch tag {
            case Tag.minorVersion: parameters.minorVersion = try exact(UInt8.self)
            case Tag.features: parameters.features = SessionFeatures(rawValue: try exact(UInt32.self))
            case Tag.maxConcurrentStreams: parameters.maxConcurrentStreams = try exact(UInt32.self)
            case Tag.connectionWindow:
                let window = try exact(UInt32.self)
                guard window >= 65536, window <= Int32.max else {
                    throw ProtocolError.handshakeFailed("connection window \(window) out of range")
                }
                parameters.connectionWindow = window
            case Tag.sessionID:
                guard field.readableBytes == 16 else {
                    throw ProtocolError.handshakeFailed("session id has length \(field.readableBytes)")
                }
                parameters.sessionID = value.readBytes(length: 16)
            default: continue
            }
        }
        return parameters
    }
}

/// The prologue both sides mix into the handshake: binds the protocol and its major version, so a peer of
/// another version fails the handshake instead of misparsing it.
public let tunnelPrologue: [UInt8] = Array("tunnel/1".utf8)
