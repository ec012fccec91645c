import Logging
import NIOCore
import NIOEmbedded
import Testing
import TunnelCrypto
import TunnelProtocol

@testable import TunnelTransport

/// A delegate that authorizes one key and records what happened.
final class TestDelegate: TunnelConnectionDelegate {
    let allowed: PublicKey?
    var established: EstablishedSession?
    var confirmed = false
    var closedWith: ProtocolError?? = nil
    var replay = ReplayTable()
    var packets: [[UInt8]] = []

    init(allowed: PublicKey? = nil) { self.allowed = allowed }

    func tunnelAuthorize(_ key: PublicKey) -> Bool { key == self.allowed }
    func tunnelCheckReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict {
        self.replay.check(key: key, timestamp: timestamp, now: .now())
    }
    func tunnelEstablished(_ tunnel: TunnelConnectionHandler, session: EstablishedSession) {
        self.established = session
    }
    func tunnelConfirmed(_ tunnel: TunnelConnectionHandler) { self.confirmed = true }
    func tunnelClosed(_ tunnel: TunnelConnectionHandler, error: ProtocolError?) { self.closedWith = .some(error) }
    func tunnel(_ tunnel: TunnelConnectionHandler, receivedIPPacket packet: ByteBuffer) {
        self.packets.append(Array(packet.readableBytesView))
    }
}

/// A stream's local end that records what the tunnel told it.
final class RecordingEndpoint: StreamEndpoint {
    var stream: TunnelStream?
    var answers: [ReplyCode] = []
    var delivered: [UInt8] = []
    var reset: ErrorCode?? = nil
    func attach(_ stream: TunnelStream) { self.stream = stream }
    func openCompleted(reply: ReplyCode, bound: TargetAddress) { self.answers.append(reply) }
    func cancelPendingOpen() {}
    var takesEarlyAnswer: Bool { true }
    func deliver(_ data: ByteBuffer) { self.delivered += Array(data.readableBytesView) }
    func peerFinished() {}
    func streamClosed(reset: ErrorCode?) { self.reset = .some(reset) }
    func readIfWanted() {}
}

struct TunnelConnectionHandlerTests {
    let serverKey = PrivateKey()
    let clientKey = PrivateKey()
    let logger = Logger(label: "test")

    func makePair(
        authorized: Bool = true,
        cipher: NoiseCipher = .chaChaPoly,
        fullTunnel: Bool = false,
        earlyData: Bool = false
    ) throws
        -> (
            client: EmbeddedChannel, server: EmbeddedChannel, clientDelegate: TestDelegate, serverDelegate: TestDelegate
        )
    {
        var configuration = TunnelConnectionHandler.Configuration()
        configuration.session.fullTunnel = fullTunnel
        configuration.session.earlyData = earlyData
        var features: SessionFeatures = []
        if fullTunnel { features.insert(.fullTunnel) }
        if earlyData { features.insert(.earlyData) }
        let clientMachine = ClientHandshakeStateMachine(
            cipher: cipher,
            staticKey: self.clientKey,
            serverKey: self.serverKey.publicKey,
            parameters: Multiplexer.announcedParameters(for: configuration.session.multiplexer, features: features)
        )
        let clientHandler = TunnelConnectionHandler(
            role: .client(clientMachine),
            configuration: configuration,
            logger: self.logger
        )
        let clientDelegate = TestDelegate()
        clientHandler.delegate = clientDelegate
        let serverHandler = TunnelConnectionHandler(
            role: .server(ServerHandshakeStateMachine(staticKey: self.serverKey, ciphers: [.aesGCM, .chaChaPoly])),
            configuration: configuration,
            logger: self.logger
        )
        let serverDelegate = TestDelegate(allowed: authorized ? self.clientKey.publicKey : nil)
        serverHandler.delegate = serverDelegate
        let client = EmbeddedChannel(handler: clientHandler)
        let server = EmbeddedChannel(handler: serverHandler)
        try server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 2)).wait()
        return (client, server, clientDelegate, serverDelegate)
    }

    /// Moves bytes both ways until nothing is left.
    func shuttle(_ a: EmbeddedChannel, _ b: EmbeddedChannel) throws {
        for _ in 0..<20 {
            a.embeddedEventLoop.run()
            b.embeddedEventLoop.run()
            var moved = false
            while let out = try a.readOutbound(as: ByteBuffer.self) {
                if b.isActive { try b.writeInbound(out) }
                moved = true
            }
            while let out = try b.readOutbound(as: ByteBuffer.self) {
                if a.isActive { try a.writeInbound(out) }
                moved = true
            }
            if !moved { return }
        }
    }

    /// Like `shuttle`, but delivers every buffer in pieces of the given sizes (cycled), so messages straddle reads.
    func shuttleInPieces(_ a: EmbeddedChannel, _ b: EmbeddedChannel, pieces: [Int]) throws {
        var index = 0
        func deliver(_ buffer: ByteBuffer, to channel: EmbeddedChannel) throws {
            var buffer = buffer
            while buffer.readableBytes > 0 && channel.isActive {
                let size = min(pieces[index % pieces.count], buffer.readableBytes)
                index += 1
                try channel.writeInbound(buffer.readSlice(length: size)!)
            }
        }
        for _ in 0..<20 {
            a.embeddedEventLoop.run()
            b.embeddedEventLoop.run()
            var moved = false
            while let out = try a.readOutbound(as: ByteBuffer.self) {
                try deliver(out, to: b)
                moved = true
            }
            while let out = try b.readOutbound(as: ByteBuffer.self) {
                try deliver(out, to: a)
                moved = true
            }
            if !moved { return }
        }
    }

    @Test(arguments: [[1], [2, 1, 7], [17, 3000, 1, 65000], [100_000]])
    func messagesSplitAcrossReadsAreReassembled(pieces: [Int]) throws {
        let (client, server, clientDelegate, serverDelegate) = try self.makePair()
        try self.shuttleInPieces(client, server, pieces: pieces)
        #expect(clientDelegate.established != nil && serverDelegate.confirmed)
        // Many PINGs and their answers, through the same splitting.
        let clientHandler = try client.pipeline.syncOperations.handler(type: TunnelConnectionHandler.self)
        for _ in 0..<50 {
            clientHandler.multiplexer?.sendPing(now: .now())
            try self.shuttleInPieces(client, server, pieces: pieces)
        }
        #expect(client.isActive && server.isActive)
        #expect(clientHandler.multiplexer?.smoothedRoundTrip != nil)
        _ = try? client.finish()
        _ = try? server.finish()
    }

    @Test(arguments: [NoiseCipher.chaChaPoly, .aesGCM])
    func handshakeEstablishesAndConfirms(cipher: NoiseCipher) throws {
        let (client, server, clientDelegate, serverDelegate) = try self.makePair(cipher: cipher)
        try self.shuttle(client, server)
        #expect(clientDelegate.established?.cipher == cipher)
        #expect(serverDelegate.established?.peerStaticKey == self.clientKey.publicKey)
        #expect(serverDelegate.confirmed, "the client's first record (its PING) confirms the session")
        _ = try? client.finish()
        _ = try? server.finish()
    }

    @Test func enqueuedPacketsLeaveOnFlushNowInOneWrite() throws {
        let (client, server, _, serverDelegate) = try self.makePair(fullTunnel: true)
        try self.shuttle(client, server)
        let clientHandler = try client.pipeline.syncOperations.handler(type: TunnelConnectionHandler.self)
        #expect(clientHandler.fullTunnelActive)
        let sent: [[UInt8]] = (0..<5).map { n in [0x45] + [UInt8](repeating: UInt8(n), count: 59 + n) }
        for packet in sent { #expect(clientHandler.enqueueIPPacket(ByteBuffer(bytes: packet))) }
        // Nothing goes out by itself: no task was scheduled for them ...
        client.embeddedEventLoop.run()
        #expect(try client.readOutbound(as: ByteBuffer.self) == nil)
        // ... until the reader's burst ends; then all of them leave in one write.
        clientHandler.flushNow()
        let written = try #require(try client.readOutbound(as: ByteBuffer.self))
        #expect(try client.readOutbound(as: ByteBuffer.self) == nil)
        try server.writeInbound(written)
        #expect(serverDelegate.packets == sent)
        // `sendIPPacket` still flushes on its own.
        #expect(clientHandler.sendIPPacket(ByteBuffer(bytes: sent[0])))
        try self.shuttle(client, server)
        #expect(serverDelegate.packets.count == 6)
        _ = try? client.finish()
        _ = try? server.finish()
    }

    @Test func unauthorizedClientGetsNothingBack() throws {
        let (client, server, clientDelegate, serverDelegate) = try self.makePair(authorized: false)
        client.embeddedEventLoop.run()
        let message1 = try #require(try client.readOutbound(as: ByteBuffer.self))
        try server.writeInbound(message1)
        server.embeddedEventLoop.run()
        #expect(try server.readOutbound(as: ByteBuffer.self) == nil, "not a single byte to an unknown key")
        #expect(!server.isActive)
        #expect(serverDelegate.established == nil)
        #expect(clientDelegate.established == nil)
        _ = try? client.finish()
    }

    @Test func garbageClosesSilently() throws {
        let (_, server, _, serverDelegate) = try self.makePair()
        try server.writeInbound(ByteBuffer(bytes: [0x00, 0x80] + [UInt8](repeating: 0xAB, count: 128)))
        #expect(try server.readOutbound(as: ByteBuffer.self) == nil)
        #expect(!server.isActive)
        #expect(serverDelegate.closedWith != nil)
    }

    @Test func oversizedHandshakeMessageIsRefusedBeforeBuffering() throws {
        let (_, server, _, _) = try self.makePair()
        try server.writeInbound(ByteBuffer(bytes: [0xFF, 0xFF, 1, 2, 3]))
        #expect(!server.isActive)
    }

    @Test func replayedFirstMessageIsRejected() throws {
        let (client, server, _, serverDelegate) = try self.makePair()
        client.embeddedEventLoop.run()
        let message1 = try #require(try client.readOutbound(as: ByteBuffer.self))
        try server.writeInbound(message1)
        #expect(serverDelegate.established != nil)
        // The same message 1 on a second connection to the same server state.
        let second = TunnelConnectionHandler(
            role: .server(ServerHandshakeStateMachine(staticKey: self.serverKey, ciphers: [.chaChaPoly])),
            logger: self.logger
        )
        second.delegate = serverDelegate
        serverDelegate.established = nil
        let replayChannel = EmbeddedChannel(handler: second)
        try replayChannel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 3)).wait()
        try replayChannel.writeInbound(message1)
        #expect(try replayChannel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(!replayChannel.isActive)
        #expect(serverDelegate.established == nil)
    }

    @Test func truncationWithoutCloseIsReportedAsSuch() throws {
        let (client, server, clientDelegate, _) = try self.makePair()
        try self.shuttle(client, server)
        client.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(clientDelegate.closedWith??.code == .truncated)
        _ = try? server.finish()
    }

    @Test func gracefulCloseSendsAnAuthenticatedClose() throws {
        let (client, server, clientDelegate, serverDelegate) = try self.makePair()
        try self.shuttle(client, server)
        var drained = false
        let serverHandler = try server.pipeline.syncOperations.handler(type: TunnelConnectionHandler.self)
        serverHandler.shutdown(drainTimeout: .seconds(1)) { drained = true }
        try self.shuttle(client, server)
        #expect(drained)
        #expect(clientDelegate.closedWith == .some(nil), "the client saw an authenticated CLOSE, not a truncation")
        #expect(serverDelegate.closedWith != nil)
    }

    @Test func tamperedRecordEndsTheConnection() throws {
        let (client, server, _, serverDelegate) = try self.makePair()
        try self.shuttle(client, server)
        let clientHandler = try client.pipeline.syncOperations.handler(type: TunnelConnectionHandler.self)
        clientHandler.multiplexer?.sendPing(now: .now())
        client.embeddedEventLoop.run()
        var record = try #require(try client.readOutbound(as: ByteBuffer.self))
        record.setInteger(record.getInteger(at: 4, as: UInt8.self)! ^ 0x80, at: 4)
        try server.writeInbound(record)
        #expect(!server.isActive)
        #expect(serverDelegate.closedWith??.code == .decryptionFailed)
    }

    // MARK: - Fast open

    /// An established pair that negotiated early data, and the client's handler.
    func establishedWithEarlyData() throws -> (EmbeddedChannel, EmbeddedChannel, TunnelConnectionHandler) {
        let (client, server, _, _) = try self.makePair(earlyData: true)
        try self.shuttle(client, server)
        return (client, server, try client.pipeline.syncOperations.handler(type: TunnelConnectionHandler.self))
    }

    @Test func aFastOpenIsAnsweredWithItsOpenOnTheWireBeforeTheTickEnds() throws {
        let (client, server, handler) = try self.establishedWithEarlyData()
        #expect(handler.earlyDataActive)
        let first = RecordingEndpoint()
        let second = RecordingEndpoint()
        let target = TargetAddress(host: .domain("example.com"), port: 443)
        #expect(handler.openStream(to: target, local: first, early: true))
        #expect(handler.openStream(to: target, local: second, early: true))
        #expect(first.answers.isEmpty, "never from inside the caller's own request handling")
        #expect(try client.readOutbound(as: ByteBuffer.self) == nil, "nothing written yet")

        handler.sendOpensNow()
        // Without a turn of the event loop: both OPENs are on the wire, both applications answered.
        #expect(try client.readOutbound(as: ByteBuffer.self) != nil)
        #expect(first.answers == [.succeeded])
        #expect(second.answers == [.succeeded])
        #expect(first.stream?.muxStream.answeredEarly == true)

        // The task queued for them finds nothing left to answer; the server's results change nothing.
        client.embeddedEventLoop.run()
        try self.shuttle(client, server)
        #expect(first.answers == [.succeeded])
        #expect(second.answers == [.succeeded])
    }

    @Test func aFastOpenNotAnsweredNowIsAnsweredWhenTheTickEnds() throws {
        let (client, _, handler) = try self.establishedWithEarlyData()
        let local = RecordingEndpoint()
        #expect(
            handler.openStream(to: TargetAddress(host: .domain("example.com"), port: 80), local: local, early: true)
        )
        #expect(local.answers.isEmpty)
        client.embeddedEventLoop.run()
        #expect(local.answers == [.succeeded])
        #expect(try client.readOutbound(as: ByteBuffer.self) != nil, "the OPEN went in the same turn")
    }

    @Test func anOpenWithoutEarlyDataWaitsForTheServersAnswer() throws {
        let (client, _, handler) = try self.establishedWithEarlyData()
        let local = RecordingEndpoint()
        #expect(
            handler.openStream(to: TargetAddress(host: .domain("example.com"), port: 80), local: local, early: false)
        )
        handler.sendOpensNow()
        #expect(try client.readOutbound(as: ByteBuffer.self) != nil, "its OPEN is written at once")
        client.embeddedEventLoop.run()
        #expect(local.answers.isEmpty, "only the OPEN_RESULT answers it")
    }
}
