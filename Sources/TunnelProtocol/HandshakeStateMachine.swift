import NIOCore
import TunnelCrypto

/// What a finished handshake hands to the record layer and the multiplexer.
public struct EstablishedSession: Sendable {
    /// The two transport cipher states.
    public var transport: NoiseTransport
    /// The AEAD both sides agreed on.
    public var cipher: NoiseCipher
    /// What the peer announced.
    public var peerParameters: SessionParameters
    /// The peer's static key (the server's pinned key, or the authenticated client's key).
    public var peerStaticKey: PublicKey
}

/// The client side of the tunnel handshake: Noise IK message 1 carries `TAI64N ‖ TLVs`, message 2 carries TLVs.
public struct ClientHandshakeStateMachine {
    private enum State {
        /// Nothing sent yet.
        case idle(NoiseIKHandshake)
        /// Message 1 is on the wire; waiting for message 2.
        case awaitingResponse(NoiseIKHandshake)
        /// Done (successfully or not); the value is spent.
        case finished
    }

    private var state: State
    private let parameters: SessionParameters
    private let serverKey: PublicKey
    /// The AEAD this attempt uses.
    public let cipher: NoiseCipher

    public init(cipher: NoiseCipher, staticKey: PrivateKey, serverKey: PublicKey, parameters: SessionParameters) {
        self.cipher = cipher
        self.parameters = parameters
        self.serverKey = serverKey
        self.state = .idle(
            NoiseIKHandshake(
                initiatorWith: cipher,
                prologue: tunnelPrologue,
                localStatic: staticKey,
                remoteStatic: serverKey
            )
        )
    }

    /// Message 1, framed (`u16 length ‖ message`), stamped with `timestamp`.
    public mutating func start(timestamp: TAI64N) throws(ProtocolError) -> ByteBuffer {
        guard case .idle(var noise) = self.state else {
            throw ProtocolError.handshakeFailed("handshake already started")
        }
        var payload = ByteBuffer(bytes: timestamp.bytes)
        self.parameters.encode(into: &payload)
        let message: [UInt8]
        do {
            message = try noise.writeMessage1(payload: Array(payload.readableBytesView))
        } catch {
            self.state = .finished
            throw ProtocolError.handshakeFailed("cannot write message 1: \(error)")
        }
        self.state = .awaitingResponse(noise)
        var framed = ByteBuffer()
        framed.reserveCapacity(2 + message.count)
        framed.writeInteger(UInt16(message.count))
        framed.writeBytes(message)
        return framed
    }

    /// Reads message 2 (without its length prefix) and finishes.
    public mutating func receivedResponse(_ message: [UInt8]) throws(ProtocolError) -> EstablishedSession {
        guard case .awaitingResponse(var noise) = self.state else {
            throw ProtocolError.handshakeFailed("unexpected handshake message")
        }
        self.state = .finished
        let payload: [UInt8]
        let transport: NoiseTransport
        do {
            (payload, transport) = try noise.readMessage2(message)
        } catch {
            throw ProtocolError.handshakeFailed("server response did not authenticate (\(error.code))")
        }
        var buffer = ByteBuffer(bytes: payload)
        let peer = try SessionParameters.decode(&buffer)
        return EstablishedSession(
            transport: transport,
            cipher: self.cipher,
            peerParameters: peer,
            peerStaticKey: self.serverKey
        )
    }
}

/// The server side of the tunnel handshake.
///
/// The client picks the AEAD; the server finds it by trying message 1 under each cipher it allows (only the
/// hash and AEAD differ, nothing is negotiated in clear). Between `receivedInitiation` and `respond` the caller
/// checks the timestamp against its replay table.
public struct ServerHandshakeStateMachine {
    /// A decrypted, authorized message 1.
    public struct Initiation: Sendable {
        /// The client's authenticated static key.
        public var clientKey: PublicKey
        /// The client's TAI64N timestamp (replay protection).
        public var timestamp: TAI64N
        /// What the client announced.
        public var parameters: SessionParameters
        /// The AEAD the client chose.
        public var cipher: NoiseCipher
    }

    private enum State {
        /// Waiting for message 1.
        case awaitingInitiation
        /// Message 1 accepted with this Noise state; message 2 not yet written.
        case initiated(NoiseIKHandshake, Initiation)
        /// Done, or failed; the value is spent.
        case finished
    }

    private var state: State = .awaitingInitiation
    /// X25519 operations spent on message 1, over every cipher tried (tests: refusals cost the same).
    public private(set) var diffieHellmanCount = 0
    private let staticKey: PrivateKey
    private let ciphers: [NoiseCipher]

    /// `ciphers` in the order to try them; unavailable ones are skipped.
    public init(staticKey: PrivateKey, ciphers: [NoiseCipher]) {
        self.staticKey = staticKey
        self.ciphers = ciphers.filter(\.isAvailable)
    }

    /// Reads message 1. `authorize` sees the client's static key before the rest is processed.
    /// On failure the caller closes silently: the error is for the log only.
    public mutating func receivedInitiation(
        _ message: [UInt8],
        authorize: (PublicKey) -> Bool
    ) throws(ProtocolError) -> Initiation {
        guard case .awaitingInitiation = self.state else {
            throw ProtocolError.handshakeFailed("unexpected handshake message")
        }
        self.state = .finished
        guard message.count >= NoiseIKHandshake.message1Overhead + TAI64N.byteCount else {
            throw ProtocolError.handshakeFailed("first message of \(message.count) bytes is too short")
        }
        var lastError: NoiseError? = nil
        var unauthorized = false
        for cipher in self.ciphers {
            var noise = NoiseIKHandshake(responderWith: cipher, prologue: tunnelPrologue, localStatic: self.staticKey)
            let payload: [UInt8]
            do {
                defer { self.diffieHellmanCount += noise.diffieHellmanCount }
                payload = try noise.readMessage1(message, authorize: authorize)
            } catch {
                // An unlisted key still goes through the other ciphers, as a listed key with a bad payload
                // does: the work before the silent close must not tell a prober which keys are clients.
                if error.code == .unauthorizedKey { unauthorized = true }
                lastError = error
                continue
            }
            guard let timestamp = TAI64N(bytes: payload.prefix(TAI64N.byteCount)) else {
                throw ProtocolError.handshakeFailed("first message has no timestamp")
            }
            var tlvs = ByteBuffer(bytes: payload.dropFirst(TAI64N.byteCount))
            let parameters = try SessionParameters.decode(&tlvs)
            let initiation = Initiation(
                clientKey: noise.remoteStatic!,
                timestamp: timestamp,
                parameters: parameters,
                cipher: cipher
            )
            self.state = .initiated(noise, initiation)
            return initiation
        }
        if unauthorized { throw ProtocolError.handshakeFailed("client key is not authorized") }
        throw ProtocolError.handshakeFailed(
            "first message did not decrypt (\(lastError?.code.description ?? "no cipher")): wrong server key or not this protocol"
        )
    }

    /// Writes message 2 (framed) announcing `parameters`, and finishes.
    public mutating func respond(
        parameters: SessionParameters
    ) throws(ProtocolError) -> (message: ByteBuffer, session: EstablishedSession) {
        guard case .initiated(var noise, let initiation) = self.state else {
            throw ProtocolError.handshakeFailed("respond out of turn")
        }
        self.state = .finished
        var payload = ByteBuffer()
        parameters.encode(into: &payload)
        let message: [UInt8]
        let transport: NoiseTransport
        do {
            (message, transport) = try noise.writeMessage2(payload: Array(payload.readableBytesView))
        } catch {
            throw ProtocolError.handshakeFailed("cannot write message 2: \(error)")
        }
        var framed = ByteBuffer()
        framed.reserveCapacity(2 + message.count)
        framed.writeInteger(UInt16(message.count))
        framed.writeBytes(message)
        let session = EstablishedSession(
            transport: transport,
            cipher: initiation.cipher,
            peerParameters: initiation.parameters,
            peerStaticKey: initiation.clientKey
        )
        return (framed, session)
    }
}

/// The server's replay table: the newest accepted timestamp per client key (WireGuard's rule: a message 1 is
/// accepted only if its timestamp is strictly newer), plus a flood limit of one handshake per key per 20 ms.
public struct ReplayTable: Sendable {
    private var entries: [PublicKey: (timestamp: TAI64N, at: NIODeadline)] = [:]
    /// Smallest spacing between two accepted handshakes of one key.
    public var minimumSpacing: TimeAmount = .milliseconds(20)

    public init() {}

    /// Why a handshake was refused.
    public enum Verdict: Equatable, Sendable {
        case accept
        /// The timestamp is not newer than the last accepted (a replay, or the client's clock went back).
        case replay
        /// Handshakes from this key come faster than `minimumSpacing`.
        case flood
    }

    /// Checks and, when accepted, records the timestamp.
    public mutating func check(key: PublicKey, timestamp: TAI64N, now: NIODeadline) -> Verdict {
        if let last = self.entries[key] {
            guard timestamp > last.timestamp else { return .replay }
            guard now - last.at >= self.minimumSpacing else { return .flood }
        }
        self.entries[key] = (timestamp, now)
        return .accept
    }
}
