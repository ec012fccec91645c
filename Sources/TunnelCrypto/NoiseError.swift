/// Why a Noise handshake failed. Never carries key material.
public struct NoiseError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kind of failure; tests compare codes.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case malformedMessage, decryptionFailed, invalidPublicKey, unauthorizedKey, wrongState
        }
        private let base: Base
        /// A message has the wrong length for its pattern.
        public static let malformedMessage = Code(base: .malformedMessage)
        /// An AEAD tag did not verify (wrong keys, or tampering).
        public static let decryptionFailed = Code(base: .decryptionFailed)
        /// A DH produced the all-zero output (a low-order point).
        public static let invalidPublicKey = Code(base: .invalidPublicKey)
        /// The responder's policy refused the initiator's static key.
        public static let unauthorizedKey = Code(base: .unauthorizedKey)
        /// A message was written or read out of turn.
        public static let wrongState = Code(base: .wrongState)
        public var description: String { self.base.rawValue }
    }

    /// The kind of failure.
    public let code: Code
    private let detail: String

    private init(code: Code, detail: String) {
        self.code = code
        self.detail = detail
    }

    @inline(never) static func malformed(_ detail: String) -> NoiseError {
        NoiseError(code: .malformedMessage, detail: detail)
    }
    @inline(never) static func decryptionFailed(_ detail: String) -> NoiseError {
        NoiseError(code: .decryptionFailed, detail: detail)
    }
    @inline(never) static func invalidPublicKey(_ detail: String) -> NoiseError {
        NoiseError(code: .invalidPublicKey, detail: detail)
    }
    @inline(never) static func unauthorized() -> NoiseError {
        NoiseError(code: .unauthorizedKey, detail: "static key not authorized")
    }
    @inline(never) static func wrongState(_ detail: String) -> NoiseError {
        NoiseError(code: .wrongState, detail: detail)
    }

    public var description: String { "\(self.code): \(self.detail)" }
}
