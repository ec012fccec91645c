import Foundation
import Testing

@testable import TunnelCrypto

/// The cacophony Noise test vectors (public domain) for the IK patterns this project speaks.
struct NoiseVectorTests {
    struct Vector {
        let name: String
        let prologue: [UInt8]
        let initStatic: [UInt8]
        let initEphemeral: [UInt8]
        let respStatic: [UInt8]
        let respEphemeral: [UInt8]
        let handshakeHash: [UInt8]
        let messages: [(payload: [UInt8], ciphertext: [UInt8])]
    }

    static func loadVectors() throws -> [Vector] {
        let url = try #require(
            Bundle.module.url(forResource: "noise-ik-vectors", withExtension: "json", subdirectory: "Fixtures")
        )
        let root = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any])
        let entries = try #require(root["vectors"] as? [[String: Any]])
        return try entries.map { entry in
            func hex(_ key: String) throws -> [UInt8] {
                let text = try #require(entry[key] as? String)
                return try #require(fromHex(text))
            }
            let messages = try #require(entry["messages"] as? [[String: String]]).map { message in
                (payload: fromHex(message["payload"]!)!, ciphertext: fromHex(message["ciphertext"]!)!)
            }
            return Vector(
                name: try #require(entry["protocol_name"] as? String),
                prologue: try hex("init_prologue"),
                initStatic: try hex("init_static"),
                initEphemeral: try hex("init_ephemeral"),
                respStatic: try hex("resp_static"),
                respEphemeral: try hex("resp_ephemeral"),
                handshakeHash: try hex("handshake_hash"),
                messages: messages
            )
        }
    }

    @Test(arguments: [NoiseCipher.chaChaPoly, NoiseCipher.aesGCM])
    func ikVectorRoundTrip(cipher: NoiseCipher) throws {
        let vectors = try Self.loadVectors()
        let vector = try #require(vectors.first { $0.name == NoiseIKHandshake.protocolName(cipher: cipher) })
        let initiatorStatic = try #require(PrivateKey(rawBytes: vector.initStatic))
        let responderStatic = try #require(PrivateKey(rawBytes: vector.respStatic))
        var initiator = NoiseIKHandshake(
            initiatorWith: cipher,
            prologue: vector.prologue,
            localStatic: initiatorStatic,
            remoteStatic: responderStatic.publicKey,
            ephemeral: PrivateKey(rawBytes: vector.initEphemeral)
        )
        var responder = NoiseIKHandshake(
            responderWith: cipher,
            prologue: vector.prologue,
            localStatic: responderStatic,
            ephemeral: PrivateKey(rawBytes: vector.respEphemeral)
        )

        let message1 = try initiator.writeMessage1(payload: vector.messages[0].payload)
        #expect(message1 == vector.messages[0].ciphertext)
        var seenKey: PublicKey?
        let payload1 = try responder.readMessage1(message1) {
            seenKey = $0
            return true
        }
        #expect(payload1 == vector.messages[0].payload)
        #expect(seenKey == initiatorStatic.publicKey)

        let (message2, responderTransport) = try responder.writeMessage2(payload: vector.messages[1].payload)
        #expect(message2 == vector.messages[1].ciphertext)
        let (payload2, initiatorTransport) = try initiator.readMessage2(message2)
        #expect(payload2 == vector.messages[1].payload)
        #expect(initiatorTransport.handshakeHash == vector.handshakeHash)
        #expect(responderTransport.handshakeHash == vector.handshakeHash)

        var i = initiatorTransport
        var r = responderTransport
        for (index, message) in vector.messages.enumerated().dropFirst(2) {
            let initiatorSends = index % 2 == 0
            var buffer = message.payload + [UInt8](repeating: 0, count: NoiseCipher.tagLength)
            buffer.withUnsafeMutableBytes { raw in
                if initiatorSends {
                    i.send.sealInPlace(raw.baseAddress!, count: message.payload.count)
                } else {
                    r.send.sealInPlace(raw.baseAddress!, count: message.payload.count)
                }
            }
            #expect(buffer == message.ciphertext, "transport message \(index)")
            var plain = [UInt8](repeating: 0, count: max(message.payload.count, 1))
            let ok = plain.withUnsafeMutableBytes { out in
                buffer.withUnsafeBytes { c in
                    initiatorSends
                        ? r.receive.open(c.baseAddress!, count: c.count, into: out.baseAddress!)
                        : i.receive.open(c.baseAddress!, count: c.count, into: out.baseAddress!)
                }
            }
            #expect(ok)
            #expect(Array(plain.prefix(message.payload.count)) == message.payload)
        }
    }

    @Test func unauthorizedInitiatorIsRefusedBeforePayload() throws {
        let server = PrivateKey()
        var initiator = NoiseIKHandshake(
            initiatorWith: .chaChaPoly,
            prologue: Array("tunnel/1".utf8),
            localStatic: PrivateKey(),
            remoteStatic: server.publicKey
        )
        var responder = NoiseIKHandshake(
            responderWith: .chaChaPoly,
            prologue: Array("tunnel/1".utf8),
            localStatic: server
        )
        let message1 = try initiator.writeMessage1(payload: [1, 2, 3])
        #expect(throws: NoiseError.self) { _ = try responder.readMessage1(message1) { _ in false } }
    }

    /// A prober who knows a client's public key (but not its private key) sends message 1 claiming it: the
    /// `ss` DH it computed is wrong, so the payload fails. An unlisted key must cost the server the same work
    /// before its refusal, or the time to the silent close tells the prober whether the key is a client's.
    @Test func listedAndUnlistedKeysAreRefusedAfterTheSameWork() throws {
        let server = PrivateKey()
        func message1() throws -> [UInt8] {
            var initiator = NoiseIKHandshake(
                initiatorWith: .chaChaPoly,
                prologue: [],
                localStatic: PrivateKey(),
                remoteStatic: server.publicKey
            )
            return try initiator.writeMessage1(payload: Array(repeating: 7, count: 12))
        }
        // Listed, but the payload does not authenticate (the prober lacks the private key).
        var tampered = try message1()
        tampered[tampered.count - 1] ^= 1
        var listed = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: [], localStatic: server)
        #expect(throws: NoiseError.self) { _ = try listed.readMessage1(tampered) { _ in true } }
        // Not listed.
        var unlisted = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: [], localStatic: server)
        do {
            let message = try message1()
            _ = try unlisted.readMessage1(message) { _ in false }
            Issue.record("an unlisted key was accepted")
        } catch {
            #expect((error as? NoiseError)?.code == .unauthorizedKey)
        }
        #expect(listed.diffieHellmanCount == 2)
        #expect(unlisted.diffieHellmanCount == listed.diffieHellmanCount)
    }

    @Test func wrongServerKeyFailsDecryption() throws {
        var initiator = NoiseIKHandshake(
            initiatorWith: .chaChaPoly,
            prologue: [],
            localStatic: PrivateKey(),
            remoteStatic: PrivateKey().publicKey
        )
        var responder = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: [], localStatic: PrivateKey())
        let message1 = try initiator.writeMessage1(payload: [])
        do {
            _ = try responder.readMessage1(message1)
            Issue.record("expected failure")
        } catch {
            #expect(error.code == .decryptionFailed)
        }
    }

    @Test func prologueMismatchFails() throws {
        let server = PrivateKey()
        var initiator = NoiseIKHandshake(
            initiatorWith: .chaChaPoly,
            prologue: Array("tunnel/1".utf8),
            localStatic: PrivateKey(),
            remoteStatic: server.publicKey
        )
        var responder = NoiseIKHandshake(
            responderWith: .chaChaPoly,
            prologue: Array("tunnel/2".utf8),
            localStatic: server
        )
        let message1 = try initiator.writeMessage1(payload: [])
        #expect(throws: NoiseError.self) { _ = try responder.readMessage1(message1) }
    }

    @Test func tamperedMessagesAreRejected() throws {
        let server = PrivateKey()
        for position in [0, 40, 90] {
            var initiator = NoiseIKHandshake(
                initiatorWith: .chaChaPoly,
                prologue: [],
                localStatic: PrivateKey(),
                remoteStatic: server.publicKey
            )
            var responder = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: [], localStatic: server)
            var message1 = try initiator.writeMessage1(payload: [9, 9, 9])
            message1[position] ^= 0x01
            #expect(throws: NoiseError.self) { _ = try responder.readMessage1(message1) }
        }
    }

    @Test func lowOrderEphemeralIsRejected() throws {
        var responder = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: [], localStatic: PrivateKey())
        let message = [UInt8](repeating: 0, count: NoiseIKHandshake.message1Overhead)
        do {
            _ = try responder.readMessage1(message)
            Issue.record("expected failure")
        } catch {
            #expect(error.code == .invalidPublicKey)
        }
    }

    @Test func truncatedMessagesAreMalformed() throws {
        var responder = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: [], localStatic: PrivateKey())
        do {
            _ = try responder.readMessage1([UInt8](repeating: 7, count: 50))
            Issue.record("expected failure")
        } catch {
            #expect(error.code == .malformedMessage)
        }
    }

    @Test func messagesOutOfTurnAreRefused() throws {
        var responder = NoiseIKHandshake(responderWith: .chaChaPoly, prologue: [], localStatic: PrivateKey())
        do {
            _ = try responder.writeMessage2(payload: [])
            Issue.record("expected failure")
        } catch {
            #expect(error.code == .wrongState)
        }
    }
}

func fromHex(_ string: String) -> [UInt8]? {
    let chars = Array(string.utf8)
    guard chars.count % 2 == 0 else { return nil }
    var out = [UInt8]()
    for i in stride(from: 0, to: chars.count, by: 2) {
        guard let byte = UInt8(String(decoding: chars[i..<i + 2], as: UTF8.self), radix: 16) else { return nil }
        out.append(byte)
    }
    return out
}

func toHex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }
