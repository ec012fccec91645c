import Testing
import TunnelCrypto

/// docs/PROTOCOL.md §7.2-§7.3: the resumption secret both ends derive, and the proof bound to a new handshake.
struct SessionResumptionTests {
    static let prologue = Array("tunnel/1".utf8)

    /// One complete IK handshake; the transports of both ends.
    static func handshake(client: PrivateKey, server: PrivateKey) throws -> (NoiseTransport, NoiseTransport) {
        var initiator = NoiseIKHandshake(
            initiatorWith: .chaChaPoly,
            prologue: Self.prologue,
            localStatic: client,
            remoteStatic: server.publicKey
        )
        var responder = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: Self.prologue, localStatic: server)
        let message1 = try initiator.writeMessage1(payload: [])
        _ = try responder.readMessage1(message1) { _ in true }
        let (message2, serverTransport) = try responder.writeMessage2(payload: [])
        let (_, clientTransport) = try initiator.readMessage2(message2)
        return (clientTransport, serverTransport)
    }

    static func bytes(_ secret: SecretBytes) -> [UInt8] { secret.withUnsafeBytes { Array($0) } }

    @Test func bothEndsDeriveTheSameSecretAndEveryHandshakeADifferentOne() throws {
        let (client, server) = (PrivateKey(), PrivateKey())
        let (c1, s1) = try Self.handshake(client: client, server: server)
        #expect(Self.bytes(c1.resumptionSecret) == Self.bytes(s1.resumptionSecret))
        #expect(c1.resumptionSecret.count == 32)
        #expect(Self.bytes(c1.resumptionSecret) != [UInt8](repeating: 0, count: 32))
        let (c2, _) = try Self.handshake(client: client, server: server)
        #expect(Self.bytes(c2.resumptionSecret) != Self.bytes(c1.resumptionSecret), "fresh ephemerals, fresh secret")
        #expect(c2.handshakeHash != c1.handshakeHash)
    }

    @Test func aProofHoldsOnlyForItsSecretSessionAndHandshake() throws {
        let (client, server) = (PrivateKey(), PrivateKey())
        let (first, firstAtServer) = try Self.handshake(client: client, server: server)
        let (next, nextAtServer) = try Self.handshake(client: client, server: server)
        let id = (0..<16).map { UInt8($0) }
        let proof = SessionResumption.proof(
            secret: first.resumptionSecret,
            sessionID: id,
            handshakeHash: next.handshakeHash
        )
        #expect(proof.count == 32)
        // The server checks it with the secret it kept and the hash of the connection it came on.
        #expect(
            SessionResumption.verify(
                proof,
                secret: firstAtServer.resumptionSecret,
                sessionID: id,
                handshakeHash: nextAtServer.handshakeHash
            )
        )
        var otherID = id
        otherID[0] ^= 1
        #expect(
            !SessionResumption.verify(
                proof,
                secret: first.resumptionSecret,
                sessionID: otherID,
                handshakeHash: next.handshakeHash
            )
        )
        #expect(
            !SessionResumption.verify(
                proof,
                secret: next.resumptionSecret,
                sessionID: id,
                handshakeHash: next.handshakeHash
            ),
            "another session's secret"
        )
        #expect(
            !SessionResumption.verify(
                proof,
                secret: first.resumptionSecret,
                sessionID: id,
                handshakeHash: first.handshakeHash
            ),
            "replayed onto another connection"
        )
        #expect(
            !SessionResumption.verify(
                Array(proof.prefix(31)),
                secret: first.resumptionSecret,
                sessionID: id,
                handshakeHash: next.handshakeHash
            )
        )
    }
}
