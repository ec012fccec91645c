/// The two `CipherState`s and the handshake hash that a finished handshake yields (Noise §5.3 `Split()`).
public struct NoiseTransport: Sendable {
    /// Encrypts what this side sends.
    public var send: CipherState
    /// Decrypts what this side receives.
    public var receive: CipherState
    /// `h` at the end of the handshake: the channel binding (Noise §11.2); never `ck`.
    public let handshakeHash: [UInt8]
    /// The secret a later connection proves this session with (docs/PROTOCOL.md §7.2): derived from `ck` by
    /// `Split()`, known to both ends, never sent.
    public let resumptionSecret: SecretBytes
}

/// Noise `HandshakeState` (§5.3) for pattern IK (§7.5) with DH 25519 and hash BLAKE2b:
///
///     IK:
///       <- s
///       ...
///       -> e, es, s, ss
///       <- e, ee, se
///
/// One value runs one side of one handshake, message by message, and never touches I/O.
public struct NoiseIKHandshake {
    /// Which side of the pattern this value plays.
    public enum Role: Sendable { case initiator, responder }

    /// Size of message 1 without payload: e (32) + encrypted s (32 + 16) + payload tag (16).
    public static let message1Overhead = 32 + 48 + 16
    /// Size of message 2 without payload: e (32) + payload tag (16).
    public static let message2Overhead = 32 + 16

    private enum State {
        /// Initiator: next writes message 1. Responder: next reads message 1.
        case expectingMessage1
        /// Initiator: next reads message 2. Responder: next writes message 2.
        case expectingMessage2
        /// Split has run; the handshake value is spent.
        case finished
    }

    /// Which side this is.
    public let role: Role
    /// The AEAD of the protocol name.
    public let cipher: NoiseCipher
    private var symmetric: SymmetricState
    private var state: State = .expectingMessage1
    private let localStatic: PrivateKey
    private var localEphemeral: PrivateKey?
    /// The peer's static key: pinned by the initiator, learned from message 1 by the responder.
    public private(set) var remoteStatic: PublicKey?
    private var remoteEphemeral: PublicKey?

    /// `Noise_IK_25519_<cipher>_BLAKE2b`.
    public static func protocolName(cipher: NoiseCipher) -> String { "Noise_IK_25519_\(cipher.rawValue)_BLAKE2b" }

    /// An initiator that pins the responder's static key. `ephemeral` is for test vectors only.
    public init(
        initiatorWith cipher: NoiseCipher,
        prologue: [UInt8],
        localStatic: PrivateKey,
        remoteStatic: PublicKey,
        ephemeral: PrivateKey? = nil
    ) {
        self.role = .initiator
        self.cipher = cipher
        self.symmetric = SymmetricState(protocolName: Self.protocolName(cipher: cipher), cipher: cipher)
        self.localStatic = localStatic
        self.localEphemeral = ephemeral
        self.remoteStatic = remoteStatic
        self.symmetric.mixHash(prologue)
        self.symmetric.mixHash(remoteStatic.bytes)  // pre-message "<- s"
    }

    /// A responder with its static key. `ephemeral` is for test vectors only.
    public init(
        responderWith cipher: NoiseCipher,
        prologue: [UInt8],
        localStatic: PrivateKey,
        ephemeral: PrivateKey? = nil
    ) {
        self.role = .responder
        self.cipher = cipher
        self.symmetric = SymmetricState(protocolName: Self.protocolName(cipher: cipher), cipher: cipher)
        self.localStatic = localStatic
        self.localEphemeral = ephemeral
        self.symmetric.mixHash(prologue)
        self.symmetric.mixHash(localStatic.publicKey.bytes)  // pre-message "<- s"
    }

    /// The current handshake hash `h`.
    public var handshakeHash: [UInt8] { self.symmetric.handshakeHash }

    /// How many DH operations this handshake has done (tests: both refusals of message 1 cost the same).
    public private(set) var diffieHellmanCount = 0

    private mutating func mixDH(_ local: PrivateKey, _ remote: PublicKey) throws(NoiseError) {
        self.diffieHellmanCount += 1
        let shared = SecretBytes(count: 32)
        guard local.diffieHellman(with: remote, into: shared) else {
            throw NoiseError.invalidPublicKey("DH produced a low-order point")
        }
        self.symmetric.mixKey(shared)
    }

    // MARK: - Message 1: -> e, es, s, ss

    /// Initiator: writes message 1 carrying `payload` (encrypted to the responder's static key; replayable).
    public mutating func writeMessage1(payload: [UInt8]) throws(NoiseError) -> [UInt8] {
        guard self.role == .initiator, case .expectingMessage1 = self.state, let rs = self.remoteStatic else {
            throw NoiseError.wrongState("writeMessage1 out of turn")
        }
        let e = self.localEphemeral ?? PrivateKey()
        self.localEphemeral = e
        var message = e.publicKey.bytes
        self.symmetric.mixHash(e.publicKey.bytes)
        try self.mixDH(e, rs)
        message += self.symmetric.encryptAndHash(self.localStatic.publicKey.bytes)
        try self.mixDH(self.localStatic, rs)
        message += self.symmetric.encryptAndHash(payload)
        self.state = .expectingMessage2
        return message
    }

    /// Responder: reads message 1 and returns its payload. `authorize` sees the initiator's static key as soon
    /// as it is decrypted, before the `ss` DH; returning `false` aborts with `.unauthorizedKey`.
    public mutating func readMessage1(
        _ message: [UInt8],
        authorize: (PublicKey) -> Bool = { _ in true }
    ) throws(NoiseError) -> [UInt8] {
        guard self.role == .responder, case .expectingMessage1 = self.state else {
            throw NoiseError.wrongState("readMessage1 out of turn")
        }
        guard message.count >= Self.message1Overhead else {
            throw NoiseError.malformed("message 1 is \(message.count) bytes, at least \(Self.message1Overhead) needed")
        }
        let re = PublicKey(bytes: message[0..<32])!
        self.remoteEphemeral = re
        self.symmetric.mixHash(re.bytes)
        try self.mixDH(self.localStatic, re)
        guard let rsBytes = self.symmetric.decryptAndHash(Array(message[32..<80])) else {
            throw NoiseError.decryptionFailed("message 1 static key did not authenticate")
        }
        let rs = PublicKey(bytes: rsBytes)!
        let authorized = authorize(rs)
        // The same work whether the key is listed or not (the `ss` DH and the payload's check) before either
        // refusal: the time to the silent close must not tell a prober whether a public key it knows (but
        // whose private key it lacks) belongs to a client.
        try self.mixDH(self.localStatic, rs)
        let payload = self.symmetric.decryptAndHash(Array(message[80...]))
        guard authorized else { throw NoiseError.unauthorized() }
        self.remoteStatic = rs
        guard let payload else {
            throw NoiseError.decryptionFailed("message 1 payload did not authenticate")
        }
        self.state = .expectingMessage2
        return payload
    }

    // MARK: - Message 2: <- e, ee, se

    /// Responder: writes message 2 carrying `payload` and finishes the handshake.
    public mutating func writeMessage2(
        payload: [UInt8]
    ) throws(NoiseError) -> (message: [UInt8], transport: NoiseTransport) {
        guard self.role == .responder, case .expectingMessage2 = self.state,
            let re = self.remoteEphemeral, let rs = self.remoteStatic
        else {
            throw NoiseError.wrongState("writeMessage2 out of turn")
        }
        let e = self.localEphemeral ?? PrivateKey()
        self.localEphemeral = e
        var message = e.publicKey.bytes
        self.symmetric.mixHash(e.publicKey.bytes)
        try self.mixDH(e, re)
        try self.mixDH(e, rs)
        message += self.symmetric.encryptAndHash(payload)
        let (initiatorToResponder, responderToInitiator, resumption) = self.symmetric.split()
        self.state = .finished
        self.localEphemeral = nil
        return (
            message,
            NoiseTransport(
                send: responderToInitiator,
                receive: initiatorToResponder,
                handshakeHash: self.handshakeHash,
                resumptionSecret: resumption
            )
        )
    }

    /// Initiator: reads message 2, returns its payload and the transport states.
    public mutating func readMessage2(
        _ message: [UInt8]
    ) throws(NoiseError) -> (payload: [UInt8], transport: NoiseTransport) {
        guard self.role == .initiator, case .expectingMessage2 = self.state, let e = self.localEphemeral else {
            throw NoiseError.wrongState("readMessage2 out of turn")
        }
        guard message.count >= Self.message2Overhead else {
            throw NoiseError.malformed("message 2 is \(message.count) bytes, at least \(Self.message2Overhead) needed")
        }
        let re = PublicKey(bytes: message[0..<32])!
        self.remoteEphemeral = re
        self.symmetric.mixHash(re.bytes)
        try self.mixDH(e, re)
        try self.mixDH(self.localStatic, re)
        guard let payload = self.symmetric.decryptAndHash(Array(message[32...])) else {
            throw NoiseError.decryptionFailed("message 2 did not authenticate")
        }
        let (initiatorToResponder, responderToInitiator, resumption) = self.symmetric.split()
        self.state = .finished
        self.localEphemeral = nil
        return (
            payload,
            NoiseTransport(
                send: initiatorToResponder,
                receive: responderToInitiator,
                handshakeHash: self.handshakeHash,
                resumptionSecret: resumption
            )
        )
    }
}
