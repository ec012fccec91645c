import NIOCore
import Testing
import TunnelCrypto

@testable import TunnelProtocol

struct HandshakeAndRecordTests {
    /// A server that takes both ciphers tries message 1 under each: a listed key whose payload fails (a prober
    /// that knows a client's public key, not its private key) and an unlisted key must cost the same X25519
    /// work over all of them, whichever cipher the prober picked, or timing tells which keys are clients.
    @Test(arguments: [NoiseCipher.aesGCM, NoiseCipher.chaChaPoly])
    func listedAndUnlistedKeysCostTheSameOverEveryCipher(probe: NoiseCipher) throws {
        guard probe.isAvailable else { return }
        var clientMachine = ClientHandshakeStateMachine(
            cipher: probe,
            staticKey: self.client,
            serverKey: self.server.publicKey,
            parameters: SessionParameters()
        )
        var message1 = try clientMachine.start(timestamp: TAI64N(unixNanoseconds: 1_800_000_000_000_000_000))
        message1.moveReaderIndex(forwardBy: 2)
        var tampered = Array(message1.readableBytesView)
        tampered[tampered.count - 1] ^= 1
        var listed = ServerHandshakeStateMachine(staticKey: self.server, ciphers: [.aesGCM, .chaChaPoly])
        #expect(throws: ProtocolError.self) { _ = try listed.receivedInitiation(tampered) { _ in true } }
        var unlisted = ServerHandshakeStateMachine(staticKey: self.server, ciphers: [.aesGCM, .chaChaPoly])
        do {
            _ = try unlisted.receivedInitiation(Array(message1.readableBytesView)) { _ in false }
            Issue.record("an unlisted key was accepted")
        } catch {
            #expect(error.detail.contains("not authorized"))
        }
        #expect(unlisted.diffieHellmanCount == listed.diffieHellmanCount)
        #expect(listed.diffieHellmanCount >= 2)
    }

    let server = PrivateKey()
    let client = PrivateKey()

    func handshake(
        cipher: NoiseCipher,
        serverCiphers: [NoiseCipher] = [.aesGCM, .chaChaPoly]
    ) throws
        -> (EstablishedSession, EstablishedSession)
    {
        var parameters = SessionParameters()
        parameters.maxConcurrentStreams = 9
        var clientMachine = ClientHandshakeStateMachine(
            cipher: cipher,
            staticKey: self.client,
            serverKey: self.server.publicKey,
            parameters: parameters
        )
        var serverMachine = ServerHandshakeStateMachine(staticKey: self.server, ciphers: serverCiphers)
        var message1 = try clientMachine.start(timestamp: TAI64N(unixNanoseconds: 1_800_000_000_000_000_000))
        let length = Int(message1.readInteger(as: UInt16.self)!)
        #expect(length == message1.readableBytes)
        let initiation = try serverMachine.receivedInitiation(Array(message1.readableBytesView)) {
            $0 == self.client.publicKey
        }
        #expect(initiation.clientKey == self.client.publicKey)
        #expect(initiation.parameters.maxConcurrentStreams == 9)
        #expect(initiation.cipher == cipher)
        var serverParameters = SessionParameters()
        serverParameters.connectionWindow = 1 << 20
        var (message2, serverSession) = try serverMachine.respond(parameters: serverParameters)
        message2.moveReaderIndex(forwardBy: 2)
        let clientSession = try clientMachine.receivedResponse(Array(message2.readableBytesView))
        #expect(clientSession.peerParameters.connectionWindow == 1 << 20)
        #expect(clientSession.transport.handshakeHash == serverSession.transport.handshakeHash)
        return (clientSession, serverSession)
    }

    @Test(arguments: [NoiseCipher.chaChaPoly, .aesGCM])
    func handshakeAndRecordsRoundTrip(cipher: NoiseCipher) throws {
        let (clientSession, serverSession) = try self.handshake(cipher: cipher)
        var sealer = RecordSealer(cipher: clientSession.transport.send, policy: RekeyPolicy(), now: .now())
        var opener = RecordOpener(cipher: serverSession.transport.receive)
        var wire = ByteBuffer()
        for size in [0, 1, 100, 65519] {
            let start = sealer.beginRecord(in: &wire)
            wire.writeBytes([UInt8](repeating: UInt8(size & 0xFF), count: size))
            try sealer.sealRecord(in: &wire, start: start)
        }
        for size in [0, 1, 100, 65519] {
            let length = try #require(try RecordFraming.nextLength(in: wire))
            #expect(length == size + 16)
            let plaintext = try wire.withUnsafeReadableBytes { raw in
                try opener.open(
                    UnsafeRawBufferPointer(rebasing: raw[2..<(2 + length)]),
                    allocator: ByteBufferAllocator()
                )
            }
            #expect(Array(plaintext.readableBytesView) == [UInt8](repeating: UInt8(size & 0xFF), count: size))
            wire.moveReaderIndex(forwardBy: 2 + length)
        }
    }

    @Test func serverFindsTheClientsCipherAndRefusesOthers() throws {
        _ = try self.handshake(cipher: .chaChaPoly, serverCiphers: [.aesGCM, .chaChaPoly])
        #expect(throws: ProtocolError.self) { _ = try self.handshake(cipher: .aesGCM, serverCiphers: [.chaChaPoly]) }
    }

    @Test func tamperedRecordFailsAndDoesNotAdvance() throws {
        let (clientSession, serverSession) = try self.handshake(cipher: .chaChaPoly)
        var sealer = RecordSealer(cipher: clientSession.transport.send, policy: RekeyPolicy(), now: .now())
        var opener = RecordOpener(cipher: serverSession.transport.receive)
        var wire = ByteBuffer()
        let start = sealer.beginRecord(in: &wire)
        wire.writeString("attack at dawn")
        try sealer.sealRecord(in: &wire, start: start)
        var tampered = wire
        tampered.setInteger(tampered.getInteger(at: 5, as: UInt8.self)! ^ 1, at: 5)
        let length = Int(wire.getInteger(at: 0, as: UInt16.self)!)
        #expect(throws: ProtocolError.self) {
            try tampered.withUnsafeReadableBytes { raw in
                _ = try opener.open(
                    UnsafeRawBufferPointer(rebasing: raw[2..<(2 + length)]),
                    allocator: ByteBufferAllocator()
                )
            }
        }
        let good = try wire.withUnsafeReadableBytes { raw in
            try opener.open(UnsafeRawBufferPointer(rebasing: raw[2..<(2 + length)]), allocator: ByteBufferAllocator())
        }
        #expect(String(buffer: good) == "attack at dawn")
    }

    @Test func rekeyKeepsBothSidesInStepAndIsTriggeredByBudget() throws {
        let (clientSession, serverSession) = try self.handshake(cipher: .aesGCM)
        let t0 = NIODeadline.now()
        var sealer = RecordSealer(
            cipher: clientSession.transport.send,
            policy: RekeyPolicy(maxBytes: 1000, maxRecords: 1 << 20, maxInterval: .minutes(10)),
            now: t0
        )
        var opener = RecordOpener(cipher: serverSession.transport.receive)
        #expect(!sealer.needsRekey(now: t0))
        var wire = ByteBuffer()
        for round in 0..<5 {
            let start = sealer.beginRecord(in: &wire)
            wire.writeBytes([UInt8](repeating: 7, count: 600))
            try sealer.sealRecord(in: &wire, start: start)
            let rekey = sealer.needsRekey(now: t0)
            #expect(rekey == (round % 2 == 1))
            let length = Int(wire.getInteger(at: wire.readerIndex, as: UInt16.self)!)
            _ = try wire.withUnsafeReadableBytes { raw in
                try opener.open(
                    UnsafeRawBufferPointer(rebasing: raw[2..<(2 + length)]),
                    allocator: ByteBufferAllocator()
                )
            }
            wire.moveReaderIndex(forwardBy: 2 + length)
            if rekey {
                sealer.rekey(now: t0)
                opener.rekey()
            }
        }
        #expect(sealer.rekeyCount == 2 && opener.rekeyCount == 2)
        #expect(
            RecordSealer(cipher: clientSession.transport.send, policy: RekeyPolicy(), now: t0).needsRekey(
                now: t0 + .minutes(11)
            )
        )
    }

    @Test func unauthorizedClientIsRefused() throws {
        var clientMachine = ClientHandshakeStateMachine(
            cipher: .chaChaPoly,
            staticKey: self.client,
            serverKey: self.server.publicKey,
            parameters: SessionParameters()
        )
        var serverMachine = ServerHandshakeStateMachine(staticKey: self.server, ciphers: [.chaChaPoly])
        var message1 = try clientMachine.start(timestamp: TAI64N(unixNanoseconds: 1))
        message1.moveReaderIndex(forwardBy: 2)
        #expect(throws: ProtocolError.self) {
            _ = try serverMachine.receivedInitiation(Array(message1.readableBytesView)) { _ in false }
        }
    }

    @Test func replayTableAcceptsOnlyNewerTimestampsAndLimitsRate() {
        var table = ReplayTable()
        let key = self.client.publicKey
        let t = NIODeadline.uptimeNanoseconds(10_000_000_000)
        #expect(table.check(key: key, timestamp: TAI64N(unixNanoseconds: 2_000_000_000), now: t) == .accept)
        #expect(
            table.check(key: key, timestamp: TAI64N(unixNanoseconds: 2_000_000_000), now: t + .seconds(1)) == .replay
        )
        #expect(
            table.check(key: key, timestamp: TAI64N(unixNanoseconds: 1_000_000_000), now: t + .seconds(1)) == .replay
        )
        #expect(
            table.check(key: key, timestamp: TAI64N(unixNanoseconds: 3_000_000_000), now: t + .milliseconds(5))
                == .flood
        )
        #expect(
            table.check(key: key, timestamp: TAI64N(unixNanoseconds: 3_000_000_000), now: t + .milliseconds(30))
                == .accept
        )
        #expect(table.check(key: PrivateKey().publicKey, timestamp: TAI64N(unixNanoseconds: 1), now: t) == .accept)
    }

    @Test func shortOrGarbageFirstMessagesFail() {
        for size in [0, 50, 107, 200] {
            var machine = ServerHandshakeStateMachine(staticKey: self.server, ciphers: [.chaChaPoly, .aesGCM])
            #expect(throws: ProtocolError.self) {
                _ = try machine.receivedInitiation([UInt8](repeating: 0x42, count: size)) { _ in true }
            }
        }
    }
}
