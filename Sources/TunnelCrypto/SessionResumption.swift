/// The proof a client gives, on a new connection, that it resumes a session of its own (docs/PROTOCOL.md
/// §7.3): `HMAC-BLAKE2b(rs, "tunnel/1 resume" ‖ session id ‖ h')` truncated to 32 bytes, where `rs` is the
/// session's resumption secret and `h'` the new connection's handshake hash. Bound to the new handshake, a
/// proof recorded on one connection is worth nothing on another.
public enum SessionResumption {
    /// Bytes of a session id.
    public static let sessionIDLength = 16
    /// Bytes of a proof.
    public static let proofLength = 32
    static let label = Array("tunnel/1 resume".utf8)

    /// The proof for `sessionID` on the connection whose handshake hash is `handshakeHash`.
    public static func proof(secret: SecretBytes, sessionID: [UInt8], handshakeHash: [UInt8]) -> [UInt8] {
        precondition(sessionID.count == Self.sessionIDLength)
        let mac = SecretBytes(count: Blake2b.hashLength)
        secret.withUnsafeBytes { key in
            Self.label.withUnsafeBytes { label in
                sessionID.withUnsafeBytes { id in
                    handshakeHash.withUnsafeBytes { hash in
                        Blake2b.hmac(key: key, data: [label, id, hash], into: mac.pointer)
                    }
                }
            }
        }
        return mac.withUnsafeBytes { Array($0.prefix(Self.proofLength)) }
    }

    /// Whether `proof` is the proof for `sessionID` on this connection, compared in constant time.
    public static func verify(
        _ proof: [UInt8],
        secret: SecretBytes,
        sessionID: [UInt8],
        handshakeHash: [UInt8]
    ) -> Bool {
        guard proof.count == Self.proofLength, sessionID.count == Self.sessionIDLength else { return false }
        let expected = Self.proof(secret: secret, sessionID: sessionID, handshakeHash: handshakeHash)
        return constantTimeEqual(proof, expected)
    }
}
