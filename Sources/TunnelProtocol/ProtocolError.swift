/// Why a tunnel connection (or one stream) must end. Carries no key material or payload bytes.
public struct ProtocolError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kind of failure; tests compare codes.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case malformedFrame, unknownFrameType, flowControlViolation, streamLimitExceeded, invalidStreamID
            case decryptionFailed, malformedRecord, nonceExhausted, handshakeFailed, handshakeRejected,
                replayedHandshake
            case truncated, resourceLimit
        }
        private let base: Base
        /// A frame's layout or payload is wrong.
        public static let malformedFrame = Code(base: .malformedFrame)
        /// A frame type below the extension range that this version does not know.
        public static let unknownFrameType = Code(base: .unknownFrameType)
        /// The peer sent more than the window it was given, or grew a window past 2^31-1.
        public static let flowControlViolation = Code(base: .flowControlViolation)
        /// The peer opened more streams than announced.
        public static let streamLimitExceeded = Code(base: .streamLimitExceeded)
        /// A stream id of the wrong parity, reused, or going backwards.
        public static let invalidStreamID = Code(base: .invalidStreamID)
        /// A record did not authenticate.
        public static let decryptionFailed = Code(base: .decryptionFailed)
        /// A record length outside 16...65535, or a record rule broken (REKEY/CLOSE not last).
        public static let malformedRecord = Code(base: .malformedRecord)
        /// The nonce counter reached its reserved value.
        public static let nonceExhausted = Code(base: .nonceExhausted)
        /// The Noise handshake failed (wrong key, tampering, unauthorized key, bad payload).
        public static let handshakeFailed = Code(base: .handshakeFailed)
        /// The peer closed or reset the connection during the handshake (what a server does to a client it
        /// does not accept, or that used the wrong server key).
        public static let handshakeRejected = Code(base: .handshakeRejected)
        /// A handshake's timestamp is not newer than the last one accepted for that key.
        public static let replayedHandshake = Code(base: .replayedHandshake)
        /// The TCP connection ended without an authenticated CLOSE.
        public static let truncated = Code(base: .truncated)
        /// The peer made this side queue more than it allows (e.g. PINGs it never reads answers to).
        public static let resourceLimit = Code(base: .resourceLimit)
        public var description: String { self.base.rawValue }
    }

    /// The kind of failure.
    public let code: Code
    /// A short human explanation for logs.
    public let detail: String

    @usableFromInline
    init(code: Code, detail: String) {
        self.code = code
        self.detail = detail
    }

    @inline(never) @usableFromInline
    static func malformedFrame(_ detail: String) -> ProtocolError {
        ProtocolError(code: .malformedFrame, detail: detail)
    }
    @inline(never)
    static func unknownFrameType(_ type: FrameType) -> ProtocolError {
        ProtocolError(code: .unknownFrameType, detail: "unknown frame type \(type)")
    }
    @inline(never)
    static func flowControl(_ detail: String) -> ProtocolError {
        ProtocolError(code: .flowControlViolation, detail: detail)
    }
    @inline(never)
    static func streamLimit(_ detail: String) -> ProtocolError {
        ProtocolError(code: .streamLimitExceeded, detail: detail)
    }
    @inline(never)
    static func invalidStreamID(_ detail: String) -> ProtocolError {
        ProtocolError(code: .invalidStreamID, detail: detail)
    }
    @inline(never)
    public static func decryptionFailed() -> ProtocolError {
        ProtocolError(code: .decryptionFailed, detail: "record failed authentication")
    }
    @inline(never)
    public static func malformedRecord(_ detail: String) -> ProtocolError {
        ProtocolError(code: .malformedRecord, detail: detail)
    }
    @inline(never)
    static func nonceExhausted() -> ProtocolError {
        ProtocolError(code: .nonceExhausted, detail: "nonce counter exhausted")
    }
    @inline(never)
    public static func handshakeFailed(_ detail: String) -> ProtocolError {
        ProtocolError(code: .handshakeFailed, detail: detail)
    }
    @inline(never)
    public static func handshakeRejected(_ detail: String) -> ProtocolError {
        ProtocolError(code: .handshakeRejected, detail: detail)
    }
    @inline(never)
    public static func replayedHandshake(_ detail: String) -> ProtocolError {
        ProtocolError(code: .replayedHandshake, detail: detail)
    }
    @inline(never)
    public static func truncated(_ detail: String) -> ProtocolError { ProtocolError(code: .truncated, detail: detail) }
    @inline(never)
    static func resourceLimit(_ detail: String) -> ProtocolError { ProtocolError(code: .resourceLimit, detail: detail) }

    public var description: String { "\(self.code): \(self.detail)" }
}

/// A code carried by RESET, GOAWAY and CLOSE frames (u32). Unknown values are kept as they are.
public struct ErrorCode: Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Normal end.
    public static let noError = ErrorCode(rawValue: 0)
    /// The peer broke the protocol.
    public static let protocolError = ErrorCode(rawValue: 1)
    /// Something failed inside the sender.
    public static let internalError = ErrorCode(rawValue: 2)
    /// The peer overran a window.
    public static let flowControlError = ErrorCode(rawValue: 3)
    /// The stream was refused before any processing (limits, going away).
    public static let refusedStream = ErrorCode(rawValue: 4)
    /// The local application aborted the stream (its socket was reset or failed).
    public static let cancel = ErrorCode(rawValue: 5)
    /// The sender is shutting down.
    public static let shutdown = ErrorCode(rawValue: 6)
    /// The connection was idle past its keepalive limit.
    public static let timeout = ErrorCode(rawValue: 7)
    /// A newer session for the same client key took over.
    public static let replaced = ErrorCode(rawValue: 8)
    /// The server has no room for this client (full-tunnel address pool exhausted).
    public static let resourceExhausted = ErrorCode(rawValue: 9)
    /// The client's key is no longer authorized (the server's operator removed it).
    public static let notAuthorized = ErrorCode(rawValue: 10)

    public var description: String {
        switch self {
        case .noError: "no error"
        case .protocolError: "protocol error"
        case .internalError: "internal error"
        case .flowControlError: "flow-control error"
        case .refusedStream: "refused"
        case .cancel: "cancelled"
        case .shutdown: "shutting down"
        case .timeout: "timeout"
        case .replaced: "replaced by a newer session"
        case .resourceExhausted: "no room on the server (its full-tunnel address pool is full)"
        case .notAuthorized: "this client's key is no longer authorized"
        default: "code \(self.rawValue)"
        }
    }
}
