import NIOCore
import Testing
import TunnelCrypto
import TunnelProtocol

/// One end of an in-memory connection: plays the connection handler around a `TunnelSession` (bytes out go
/// to an outbox, the streams' local sockets are `RecordingDelegate`), with no NIO channel and no clock.
final class SessionEnd: TunnelSessionDelegate {
    let session: TunnelSession
    let streams = RecordingDelegate()
    /// Bytes written to the connection, not yet delivered to the other end.
    var outbox = ByteBuffer()
    var establishedCount = 0
    var confirmedCount = 0
    var peerClosed: ErrorCode?
    var authorized: Set<PublicKey> = []
    var replay = ReplayTable()
    /// Server: ends whose connection broke, whose sessions a client may resume.
    var detached: [SessionEnd] = []
    /// What resumption told this end: records replayed, or the refusal's status.
    var resumedReplays: [Int] = []
    var resumeRefusals: [UInt8] = []

    init(_ role: TunnelSession.Role, configuration: TunnelSession.Configuration, now: NIODeadline) {
        self.session = TunnelSession(role: role, configuration: configuration, now: now)
        self.session.delegate = self
        self.session.multiplexerDelegate = self.streams
    }

    func sessionAuthorize(_ key: PublicKey) -> Bool { self.authorized.contains(key) }
    func sessionCheckReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict {
        self.replay.check(key: key, timestamp: timestamp, now: .now())
    }
    func session(_ session: TunnelSession, send message: ByteBuffer) {
        var message = message
        self.outbox.writeBuffer(&message)
    }
    func session(_ session: TunnelSession, established: EstablishedSession) { self.establishedCount += 1 }
    func sessionConfirmed(_ session: TunnelSession) { self.confirmedCount += 1 }
    func session(_ session: TunnelSession, peerClosed code: ErrorCode) { self.peerClosed = code }
    func sessionResumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate? {
        self.detached.lazy.compactMap { $0.session.resumeCandidate }
            .first { $0.sessionID == id && $0.clientKey == key }
    }
    func session(
        _ session: TunnelSession,
        resumeAccepted candidate: ResumeCandidate,
        connection: TunnelSession.Connection,
        peerCount: UInt64
    ) {
        // What a server's runtime does on the resumed session's own loop.
        let end = self.detached.first { $0.session.sessionID == candidate.sessionID }!
        try! end.session.takeConnection(connection, peerCount: peerCount)
    }
    func session(_ session: TunnelSession, resumed replayed: Int) { self.resumedReplays.append(replayed) }
    func session(_ session: TunnelSession, resumeRefused status: UInt8) { self.resumeRefusals.append(status) }

    /// What the handler does after events: seal whatever the multiplexer queued.
    func flush(now: NIODeadline) throws {
        try self.session.produceRecords(into: &self.outbox, batchBytes: Int.max, now: now)
    }
}

/// A byte pipe between two session ends; `deliver` moves what one wrote to the other, in pieces of
/// `chunk` bytes (as TCP may split them).
struct MemoryConnection {
    var chunk = 1000
    func deliver(from sender: SessionEnd, to receiver: SessionEnd, now: NIODeadline) throws {
        var bytes = sender.outbox
        sender.outbox = ByteBuffer()
        while bytes.readableBytes > 0 {
            let piece = bytes.readSlice(length: min(self.chunk, bytes.readableBytes))!
            receiver.session.noteReceive(now: now)
            try receiver.session.received(piece)
        }
    }
}

struct TunnelSessionTests {
    let t0 = NIODeadline.uptimeNanoseconds(5_000_000_000_000)
    let serverKey = PrivateKey()
    let clientKey = PrivateKey()

    func configuration() -> TunnelSession.Configuration {
        var configuration = TunnelSession.Configuration()
        // Small budgets so a test sees rekeys: every 64 KiB of records.
        configuration.rekeyPolicy = RekeyPolicy(maxBytes: 64 << 10, maxRecords: 1 << 20, maxInterval: .minutes(10))
        return configuration
    }

    func makeEnds(
        now: NIODeadline,
        client clientConfiguration: TunnelSession.Configuration? = nil,
        server serverConfiguration: TunnelSession.Configuration? = nil
    ) -> (client: SessionEnd, server: SessionEnd) {
        let client = SessionEnd(
            .client(
                ClientHandshakeStateMachine(
                    cipher: .chaChaPoly,
                    staticKey: self.clientKey,
                    serverKey: self.serverKey.publicKey,
                    parameters: Multiplexer.announcedParameters(
                        for: .init(),
                        features: clientConfiguration?.features ?? []
                    )
                )
            ),
            configuration: clientConfiguration ?? self.configuration(),
            now: now
        )
        let server = SessionEnd(
            .server(ServerHandshakeStateMachine(staticKey: self.serverKey, ciphers: [.chaChaPoly])),
            configuration: serverConfiguration ?? self.configuration(),
            now: now
        )
        server.authorized = [self.clientKey.publicKey]
        return (client, server)
    }

    /// Opens a stream from the client to `target`, has the server accept it, and returns both ends.
    func openAccepted(
        _ client: SessionEnd,
        _ server: SessionEnd,
        to target: TargetAddress,
        over connection: MemoryConnection,
        now: NIODeadline
    ) throws -> (client: MuxStream, server: MuxStream) {
        let clientStream = client.session.multiplexer!.openStream(to: target)!
        try self.pump(client, server, over: connection, now: now)
        let serverStream = server.session.multiplexer!.stream(clientStream.id)!
        server.session.multiplexer!.completeOpen(serverStream, reply: .succeeded, bound: .unspecified)
        try self.pump(client, server, over: connection, now: now)
        return (clientStream, serverStream)
    }

    /// Moves bytes both ways until neither end has anything more to say.
    func pump(_ client: SessionEnd, _ server: SessionEnd, over connection: MemoryConnection, now: NIODeadline) throws {
        for _ in 0..<1000 {
            try client.flush(now: now)
            try server.flush(now: now)
            if client.outbox.readableBytes == 0 && server.outbox.readableBytes == 0 { return }
            try connection.deliver(from: client, to: server, now: now)
            try connection.deliver(from: server, to: client, now: now)
        }
        Issue.record("the ends never went quiet")
    }

    @Test func twoSessionsBackToBackThroughHandshakeStreamsRekeyKeepaliveAndDeadPeer() throws {
        var now = self.t0
        let (client, server) = self.makeEnds(now: now)
        let connection = MemoryConnection()
        try client.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
        try server.session.start(now: now, wallClock: 0)
        try self.pump(client, server, over: connection, now: now)
        #expect(client.session.phase == .established && server.session.phase == .established)
        #expect(client.establishedCount == 1 && server.establishedCount == 1)
        // The client's first record (its PING) confirmed it to the server.
        #expect(server.confirmedCount == 1)
        #expect(server.session.established?.peerStaticKey == self.clientKey.publicKey)

        // A stream, both ways, more than many records' worth.
        let (clientStream, serverStream) = try self.openAccepted(
            client,
            server,
            to: TargetAddress(host: .domain("example.com"), port: 443),
            over: connection,
            now: now
        )
        #expect(client.streams.events.contains(.openCompleted(clientStream.id, .succeeded, .unspecified)))
        var expectedUp: [UInt8] = []
        for i in 0..<8 { expectedUp += Array(bytes(64 << 10, seed: UInt8(i)).readableBytesView) }
        for i in 0..<8 {
            client.session.multiplexer!.localRead(bytes(64 << 10, seed: UInt8(i)), on: clientStream)
            try self.pump(client, server, over: connection, now: now)
            let got = server.streams.delivered[clientStream.id.rawValue]?.count ?? 0
            server.session.multiplexer!.consumed(got - i * (64 << 10), on: serverStream, now: now)
        }
        try self.pump(client, server, over: connection, now: now)
        let up = server.streams.delivered[clientStream.id.rawValue] ?? []
        #expect(up.count == expectedUp.count && up == expectedUp, "bytes differ")
        server.session.multiplexer!.localRead(bytes(200_000, seed: 9), on: serverStream)
        try self.pump(client, server, over: connection, now: now)
        let down = client.streams.delivered[clientStream.id.rawValue] ?? []
        #expect(down.count == 200_000 && down == Array(bytes(200_000, seed: 9).readableBytesView), "bytes differ")
        // Rekeys happened in both directions, and each side's receiver followed the other's sender.
        #expect(client.session.sendRekeys >= 4 && server.session.receiveRekeys == client.session.sendRekeys)
        #expect(server.session.sendRekeys >= 1 && client.session.receiveRekeys == server.session.sendRekeys)

        // Keepalive: after 15 s of silence each side sends a PING, whose answer keeps both alive.
        now = now + .seconds(16)
        try client.session.tick(now: now)
        try server.session.tick(now: now)
        #expect(client.session.hasOutput && server.session.hasOutput, "both send a PING")
        try self.pump(client, server, over: connection, now: now)
        now = now + .seconds(40)
        try client.session.tick(now: now)
        try server.session.tick(now: now)

        // Dead peer: the server goes silent (its bytes never arrive); the client declares it dead at 45 s.
        now = now + .seconds(46)
        #expect(throws: ProtocolError.self) { try client.session.tick(now: now) }
    }

    /// The seam resuming needs: a session with an open stream is moved from one connection to another; it
    /// holds no reference to either, so the bytes simply continue on the new one.
    @Test func aSessionWithOpenStreamsMovesToAnotherConnection() throws {
        let now = self.t0
        let (client, server) = self.makeEnds(now: now)
        let first = MemoryConnection(chunk: 700)
        try client.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
        try self.pump(client, server, over: first, now: now)
        let (clientStream, serverStream) = try self.openAccepted(
            client,
            server,
            to: TargetAddress(host: .ipv4(0x0A00_0001), port: 22),
            over: first,
            now: now
        )
        client.session.multiplexer!.localRead(bytes(3000, seed: 1), on: clientStream)
        try self.pump(client, server, over: first, now: now)

        let second = MemoryConnection(chunk: 13)
        client.session.multiplexer!.localRead(bytes(5000, seed: 2), on: clientStream)
        server.session.multiplexer!.localRead(bytes(4000, seed: 3), on: serverStream)
        try self.pump(client, server, over: second, now: now)
        let up = server.streams.delivered[clientStream.id.rawValue] ?? []
        #expect(up.count == 8000)
        #expect(
            up == Array(bytes(3000, seed: 1).readableBytesView) + Array(bytes(5000, seed: 2).readableBytesView),
            "bytes differ"
        )
        let down = client.streams.delivered[clientStream.id.rawValue] ?? []
        #expect(down == Array(bytes(4000, seed: 3).readableBytesView), "bytes differ")
    }

    /// A drain (docs/PROTOCOL.md §3.6): GOAWAY reaches the peer at once and no stream opens after it; the
    /// CLOSE is due with "no error" when the last stream finished, or with "shutting down" at the deadline.
    @Test func aDrainEndsWhenTheLastStreamFinishesOrAtItsDeadline() throws {
        for finishInTime in [true, false] {
            let now = self.t0
            let (client, server) = self.makeEnds(now: now)
            let connection = MemoryConnection()
            try client.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
            try self.pump(client, server, over: connection, now: now)
            let (clientStream, serverStream) = try self.openAccepted(
                client,
                server,
                to: TargetAddress(host: .domain("example.com"), port: 80),
                over: connection,
                now: now
            )

            #expect(server.session.drainCloseDue(now: now) == nil, "not draining")
            #expect(server.session.beginDrain(deadline: now + .seconds(5)))
            #expect(server.session.isDraining && !server.session.canOpenStream)
            #expect(server.session.nextTick(after: now + .seconds(3)) == now + .seconds(5), "it wakes at the deadline")
            try self.pump(client, server, over: connection, now: now)
            #expect(client.streams.events.contains { if case .goingAway = $0 { true } else { false } })
            #expect(server.session.drainCloseDue(now: now + .seconds(4)) == nil, "a stream is still open")

            if finishInTime {
                // The stream still carries data after GOAWAY, then ends both ways.
                client.session.multiplexer!.localRead(bytes(1000, seed: 4), on: clientStream)
                client.session.multiplexer!.localEndOfStream(on: clientStream)
                try self.pump(client, server, over: connection, now: now)
                #expect(server.streams.delivered[clientStream.id.rawValue]?.count == 1000)
                server.session.multiplexer!.localEndOfStream(on: serverStream)
                try self.pump(client, server, over: connection, now: now)
                server.session.multiplexer!.release(serverStream)
                #expect(server.session.drainCloseDue(now: now + .seconds(1)) == .noError)
            } else {
                #expect(server.session.drainCloseDue(now: now + .seconds(5)) == .shutdown)
            }
            var record = ByteBuffer()
            try server.session.close(code: .noError, into: &record)
            #expect(!server.session.isDraining && server.session.phase == .closed)
        }
        // Nothing to drain before the handshake: the caller closes at once.
        let (_, idle) = self.makeEnds(now: self.t0)
        #expect(!idle.session.beginDrain(deadline: self.t0 + .seconds(5)))
    }

    /// Records hold at most the size asked for (small records on a slow link), but a datagram that cannot be
    /// split still goes out whole, in a record of its own size.
    @Test func recordsKeepToTheAskedSizeExceptForAnUnsplittableFrame() throws {
        let now = self.t0
        let (client, server) = self.makeEnds(now: now)
        let connection = MemoryConnection()
        try client.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
        try self.pump(client, server, over: connection, now: now)
        let mux = client.session.multiplexer!
        let tcp = mux.openStream(to: TargetAddress(host: .domain("example.com"), port: 80))!
        let udp = mux.openStream(to: TargetAddress(host: .ipv4(0), port: 0), kind: .udp)!
        try self.pump(client, server, over: connection, now: now)
        for id in [tcp.id, udp.id] {
            let stream = server.session.multiplexer!.stream(id)!
            server.session.multiplexer!.completeOpen(stream, reply: .succeeded, bound: .unspecified)
        }
        try self.pump(client, server, over: connection, now: now)

        mux.localRead(bytes(100_000, seed: 5), on: tcp)
        var records = ByteBuffer()
        try client.session.produceRecords(into: &records, batchBytes: 40_000, recordBytes: 8192, now: now)
        var sizes: [Int] = []
        var reader = records
        while let length = reader.readInteger(as: UInt16.self) {
            sizes.append(Int(length))
            reader.moveReaderIndex(forwardBy: Int(length))
        }
        // Each record: at most 8192 bytes of frames, plus its type byte, padding and tag (under 64 bytes).
        #expect(sizes.count >= 5 && sizes.allSatisfy { $0 <= 8192 + 64 }, "\(sizes)")

        #expect(mux.sendDatagram(bytes(30_000, seed: 6), on: udp))
        var big = ByteBuffer()
        try client.session.produceRecords(into: &big, batchBytes: 1, recordBytes: 8192, now: now)
        let first = Int(big.getInteger(at: big.readerIndex, as: UInt16.self) ?? 0)
        #expect(first > 30_000, "the datagram went whole")
    }

    @Test func anUnlistedClientAndAReplayedFirstMessageAreRefused() throws {
        let now = self.t0
        let (client, server) = self.makeEnds(now: now)
        server.authorized = []
        try client.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
        let message = client.outbox
        #expect(throws: ProtocolError.self) { try server.session.received(message) }

        // A listed client's message 1, played twice to two fresh servers sharing one replay table.
        let (client2, server2) = self.makeEnds(now: now)
        try client2.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
        let first = client2.outbox
        let again = client2.outbox
        try server2.session.received(first)
        #expect(server2.session.phase == .established)
        let (_, server3) = self.makeEnds(now: now)
        server3.replay = server2.replay
        #expect(throws: ProtocolError.self) { try server3.session.received(again) }
    }

    /// Bytes arrive however TCP splits them: one byte at a time works; a length no message may have fails at
    /// once, without waiting for bytes that would never make it valid.
    @Test func messagesAreReassembledAcrossReadsAndABadLengthFailsAtOnce() throws {
        let now = self.t0
        let (client, server) = self.makeEnds(now: now)
        try client.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
        try self.pump(client, server, over: MemoryConnection(chunk: 1), now: now)
        #expect(client.session.phase == .established && server.session.phase == .established)

        // 65535 bytes announced for a handshake message (at most 4096): one byte of the length says nothing
        // yet; the second refuses it on the length alone.
        let (_, other) = self.makeEnds(now: now)
        try other.session.received(ByteBuffer(bytes: [0xFF]))
        #expect(throws: ProtocolError.self) { try other.session.received(ByteBuffer(bytes: [0xFF])) }
        // A length below the smallest record.
        let (_, third) = self.makeEnds(now: now)
        #expect(throws: ProtocolError.self) { try third.session.received(ByteBuffer(bytes: [0x00, 0x05, 1, 2, 3])) }
    }

    @Test func featuresAreOnOnlyWhenBothSidesWantThem() {
        var configuration = TunnelSession.Configuration()
        configuration.compression = true
        #expect(
            TunnelSession.agreedFeatures(offered: [.compression, .fullTunnel], configuration: configuration) == [
                .compression
            ]
        )
        configuration.compression = false
        #expect(TunnelSession.agreedFeatures(offered: [.compression], configuration: configuration) == [])
        configuration.fullTunnel = true
        #expect(
            TunnelSession.agreedFeatures(offered: [.fullTunnel], configuration: configuration) == [.fullTunnel],
            "a peer without datagram credit (an older build) gets none"
        )
        #expect(TunnelSession.Configuration().features.contains(.datagramCredit), "offered by default")
        #expect(
            TunnelSession.agreedFeatures(offered: [.datagramCredit], configuration: configuration) == [.datagramCredit]
        )
    }

    @Test func offloadHeadersAreOfferedOnlyWithAFullTunnelAndAgreedOnlyWhenBothHaveThem() {
        var configuration = TunnelSession.Configuration()
        configuration.packetOffload = true
        #expect(!configuration.features.contains(.packetOffload), "no IP packets, no offload headers")
        configuration.fullTunnel = true
        #expect(configuration.features.contains(.packetOffload))
        #expect(
            TunnelSession.agreedFeatures(offered: [.fullTunnel, .packetOffload], configuration: configuration)
                == [.fullTunnel, .packetOffload]
        )
        #expect(
            TunnelSession.agreedFeatures(offered: [.fullTunnel], configuration: configuration) == [.fullTunnel],
            "a peer without them (an older build, or a device without them) gets plain packets"
        )
        configuration.packetOffload = false
        #expect(
            TunnelSession.agreedFeatures(offered: [.fullTunnel, .packetOffload], configuration: configuration)
                == [.fullTunnel]
        )
    }
}
