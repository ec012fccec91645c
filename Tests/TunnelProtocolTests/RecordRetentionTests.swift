import NIOCore
import Testing
import TunnelCrypto
import TunnelProtocol
import TunnelTestSupport

/// Session resumption, docs/PROTOCOL.md §7.1: records numbered, kept until acknowledged, and exactly the
/// unprocessed ones available to send again.
struct RecordRetentionTests {
    static func plaintext(_ byte: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: byte, count: count) }

    @Test func recordsAreKeptUntilAcknowledgedAndTheRestCanBeSentAgain() throws {
        var retention = RecordRetention()
        for (i, size) in [100, 200, 300].enumerated() {
            Self.plaintext(UInt8(i), size).withUnsafeBytes { retention.append(copying: $0) }
        }
        #expect(retention.count == 3 && retention.bytes == 600 && retention.nextSequence == 4)
        try retention.acknowledge(through: 1)
        #expect(retention.count == 2 && retention.bytes == 500 && retention.acknowledged == 1)
        try retention.acknowledge(through: 0)  // an older acknowledgement: ignored
        #expect(retention.count == 2)
        let again = try retention.records(after: 2)
        #expect(again.map { Array($0.readableBytesView) } == [Self.plaintext(2, 300)])
        #expect(try retention.records(after: 1).count == 2)
        #expect(try retention.records(after: 3).isEmpty, "the peer has everything")
        #expect(throws: ProtocolError.self) { try retention.acknowledge(through: 4) }  // never sent
        #expect(throws: ProtocolError.self) { _ = try retention.records(after: 4) }
        #expect(throws: ProtocolError.self) { _ = try retention.records(after: 0) }  // it acknowledged 1
        try retention.acknowledge(through: 3)
        #expect(retention.count == 0 && retention.bytes == 0)
    }

    /// The records live back to back in one ring that wraps and grows: against a plain list of copies, every
    /// record comes back intact, whether it wrapped, was moved by a growth, or was held through both.
    @Test func theRingKeepsEveryRecordIntactThroughWrapsAndGrowth() throws {
        var retention = RecordRetention()
        var model: [[UInt8]] = []  // records acknowledged + 1 ..< next
        var generator = SplitMix64(seed: 18)  // fixed: a failure replays the same way
        var sequence: UInt8 = 0
        for step in 0..<4000 {
            // Mostly sends with a bounded backlog, so the ring wraps many times; bursts make it grow.
            let burst = step % 500 < 20
            if burst || model.count < 8 || Bool.random(using: &generator) {
                let size = Int.random(in: 1...(burst ? 16_384 : 3000), using: &generator)
                sequence &+= 1
                let record = (0..<size).map { UInt8(truncatingIfNeeded: $0) &+ sequence }
                record.withUnsafeBytes { retention.append(copying: $0) }
                model.append(record)
            } else {
                let drop = Int.random(in: 1...model.count, using: &generator)
                try retention.acknowledge(through: retention.acknowledged + UInt64(drop))
                model.removeFirst(drop)
            }
            #expect(retention.count == model.count)
            #expect(retention.bytes == model.reduce(0) { $0 + $1.count })
            if step % 97 == 0 {
                let skip = Int.random(in: 0...model.count, using: &generator)
                let again = try retention.records(after: retention.acknowledged + UInt64(skip))
                #expect(again.map { Array($0.readableBytesView) } == Array(model[skip...]))
            }
        }
        try retention.acknowledge(through: retention.nextSequence - 1)
        #expect(retention.count == 0 && retention.bytes == 0)
        // Empty again, it starts over.
        [UInt8](repeating: 7, count: 100).withUnsafeBytes { retention.append(copying: $0) }
        #expect(
            try retention.records(after: retention.acknowledged).map { Array($0.readableBytesView) } == [
                [UInt8](repeating: 7, count: 100)
            ]
        )
    }

    /// Records handed out for sending again stay as they were while new records are kept after them.
    @Test func recordsHandedOutAreNotChangedByLaterOnes() throws {
        var retention = RecordRetention()
        [UInt8](repeating: 1, count: 1000).withUnsafeBytes { retention.append(copying: $0) }
        let handed = try retention.records(after: 0)
        for _ in 0..<200 { [UInt8](repeating: 2, count: 1000).withUnsafeBytes { retention.append(copying: $0) } }
        #expect(Array(handed[0].readableBytesView) == [UInt8](repeating: 1, count: 1000))
    }
}

extension TunnelSessionTests {
    func resumable(_ configure: (inout TunnelSession.Configuration) -> Void = { _ in }) -> TunnelSession.Configuration {
        var configuration = self.configuration()
        configuration.resumption = true
        configure(&configuration)
        return configuration
    }

    /// Ends through the handshake, and a stream the server accepted.
    func resumableEnds(
        client: TunnelSession.Configuration,
        server: TunnelSession.Configuration,
        now: NIODeadline
    ) throws -> (SessionEnd, SessionEnd, MuxStream, MuxStream) {
        let (clientEnd, serverEnd) = self.makeEnds(now: now, client: client, server: server)
        let connection = MemoryConnection()
        try clientEnd.session.start(now: now, wallClock: 1_700_000_000_000_000_000)
        try serverEnd.session.start(now: now, wallClock: 0)
        try self.pump(clientEnd, serverEnd, over: connection, now: now)
        let (c, s) = try self.openAccepted(
            clientEnd,
            serverEnd,
            to: TargetAddress(host: .domain("example.com"), port: 443),
            over: connection,
            now: now
        )
        return (clientEnd, serverEnd, c, s)
    }

    @Test func resumptionIsOnOnlyWhenBothEndsWantItAndThenKeepsOnlyWhatIsInFlight() throws {
        let now = self.t0
        let (plainClient, plainServer, _, _) = try self.resumableEnds(
            client: self.configuration(),
            server: self.resumable(),
            now: now
        )
        #expect(plainClient.session.retention == nil && plainServer.session.retention == nil)

        let (client, server, clientStream, serverStream) = try self.resumableEnds(
            client: self.resumable(),
            server: self.resumable(),
            now: now
        )
        #expect(client.session.retention != nil && server.session.retention != nil)
        let connection = MemoryConnection()
        var expected: [UInt8] = []
        for i in 0..<16 {
            let chunk = bytes(64 << 10, seed: UInt8(i))
            expected += Array(chunk.readableBytesView)
            client.session.multiplexer!.localRead(chunk, on: clientStream)
            server.session.multiplexer!.localRead(chunk, on: serverStream)
            try self.pump(client, server, over: connection, now: now)
            for (end, stream) in [(server, serverStream), (client, clientStream)] {
                end.session.multiplexer!.consumed(stream.bufferedBytes, on: stream, now: now)
            }
        }
        try self.pump(client, server, over: connection, now: now)
        #expect(server.streams.delivered[clientStream.id.rawValue] ?? [] == expected)
        #expect(client.streams.delivered[clientStream.id.rawValue] ?? [] == expected)
        // A megabyte each way went through; each end keeps only the last few records, which the next
        // acknowledgement covers.
        for end in [client, server] {
            let retention = end.session.retention!
            #expect(retention.nextSequence > 20)
            #expect(retention.count <= 2, "kept \(retention.count) records")
            #expect(end.session.processedRecords > 20)
        }
    }

    @Test func theRecordsAPeerNeverProcessedAreExactlyTheOnesKeptAndReplayThemIntact() throws {
        let now = self.t0
        let (client, server, clientStream, _) = try self.resumableEnds(
            client: self.resumable(),
            server: self.resumable(),
            now: now
        )
        // 300 KiB up: about five records and (with the test's 64 KiB rekey budget) several rekeys.
        let sent = bytes(300 << 10, seed: 7)
        client.session.multiplexer!.localRead(sent, on: clientStream)
        try client.flush(now: now)
        // Only the first two records reach the server; the connection breaks with the rest in flight.
        var wire = client.outbox
        client.outbox = ByteBuffer()
        var delivered = ByteBuffer()
        for _ in 0..<2 {
            let length = Int(wire.getInteger(at: wire.readerIndex, as: UInt16.self)!)
            var record = wire.readSlice(length: 2 + length)!
            delivered.writeBuffer(&record)
        }
        #expect(wire.readableBytes > 0)
        try server.session.received(delivered)
        let processed = server.session.processedRecords
        let got = server.streams.delivered[clientStream.id.rawValue]?.count ?? 0
        #expect(got > 0 && got < sent.readableBytes)

        // What the client kept after the server's count is the rest, with no REKEY in it: replayed into the
        // server's multiplexer (as a new connection would carry it), the stream is whole and in order.
        let again = try client.session.retention!.records(after: processed)
        #expect(again.count >= 3)
        for var record in again {
            let outcome = try server.session.multiplexer!.receivedRecord(&record, now: now)
            #expect(!outcome.rekey && outcome.close == nil)
        }
        #expect(server.streams.delivered[clientStream.id.rawValue] ?? [] == Array(sent.readableBytesView))
    }

    @Test func aPeerThatDoesNotAcknowledgeStopsTheSenderAtItsLimit() throws {
        let now = self.t0
        let limit = 256 << 10
        let (client, server, clientStream, serverStream) = try self.resumableEnds(
            client: self.resumable { $0.maxRetainedBytes = limit },
            server: self.resumable { $0.acknowledgeEvery = 2 },
            now: now
        )
        client.session.multiplexer!.localRead(bytes(900 << 10, seed: 3), on: clientStream)
        try client.flush(now: now)
        let retained = client.session.retention!.bytes
        #expect(retained >= limit && retained < limit + WireLimits.maxRecordPlaintext, "kept \(retained)")
        #expect(!client.session.hasOutput, "nothing more until acknowledged")
        #expect(client.session.multiplexer!.hasOutput, "though the stream still has bytes to send")
        try client.flush(now: now)
        #expect(client.session.retention!.bytes == retained)

        // The acknowledgements come back (records of RECEIVED alone, since the server has nothing else to say)
        // and the rest flows.
        try self.pump(client, server, over: MemoryConnection(), now: now)
        server.session.multiplexer!.consumed(serverStream.bufferedBytes, on: serverStream, now: now)
        try self.pump(client, server, over: MemoryConnection(), now: now)
        #expect(server.streams.delivered[clientStream.id.rawValue]?.count == 900 << 10)
    }

    @Test func theServerNamesAResumableSessionAndBothEndsHoldItsSecret() throws {
        let now = self.t0
        let (client, server, _, _) = try self.resumableEnds(
            client: self.resumable(),
            server: self.resumable(),
            now: now
        )
        let id = try #require(server.session.sessionID)
        #expect(id.count == 16 && client.session.sessionID == id)
        let clientSecret = client.session.established!.transport.resumptionSecret.withUnsafeBytes { Array($0) }
        let serverSecret = server.session.established!.transport.resumptionSecret.withUnsafeBytes { Array($0) }
        #expect(clientSecret == serverSecret)

        let (plainClient, plainServer, _, _) = try self.resumableEnds(
            client: self.configuration(),
            server: self.resumable(),
            now: now
        )
        #expect(plainClient.session.sessionID == nil && plainServer.session.sessionID == nil)
    }

    @Test func theSessionIDParameterRoundTripsAndHasItsExactLength() throws {
        var parameters = SessionParameters()
        parameters.sessionID = Array(0..<16)
        var buffer = ByteBuffer()
        parameters.encode(into: &buffer)
        #expect(try SessionParameters.decode(&buffer).sessionID == Array(0..<16))
        buffer = ByteBuffer()
        buffer.writeInteger(UInt8(0x06))
        buffer.writeInteger(UInt16(15))
        buffer.writeBytes([UInt8](repeating: 1, count: 15))
        #expect(throws: ProtocolError.self) { _ = try SessionParameters.decode(&buffer) }
    }

    @Test func receivedIsCheckedLikeEveryOtherFrame() throws {
        let plain = Multiplexer(role: .server, configuration: .init(), peerParameters: SessionParameters())
        var record = ByteBuffer()
        plain.writeReceivedFrame(count: 1, into: &record)
        #expect(throws: ProtocolError.self) { _ = try plain.receivedRecord(&record, now: .now()) }

        var configuration = Multiplexer.Configuration()
        configuration.resumption = true
        let mux = Multiplexer(role: .server, configuration: configuration, peerParameters: SessionParameters())
        record = ByteBuffer()
        mux.writeReceivedFrame(count: 5, into: &record)
        mux.writeReceivedFrame(count: 3, into: &record)
        #expect(try mux.receivedRecord(&record, now: .now()).acknowledged == 5)
        record = ByteBuffer()
        record.writeFrameHeader(FrameHeader(type: .received, streamID: .connection, length: 4))
        record.writeInteger(UInt32(1))
        #expect(throws: ProtocolError.self) { _ = try mux.receivedRecord(&record, now: .now()) }
    }
}

/// Session resumption, docs/PROTOCOL.md §7.3: a new connection carries a session on.
extension TunnelSessionTests {
    /// The connection under `client` and `server` broke: both detach, and the client reconnects (as
    /// `clientKey`, by default its own) to a new server end that knows `server` as detached. Returns the new
    /// server end, through the handshake and the RESUME; the session goes on at `server` if it resumed.
    func reconnect(
        _ client: SessionEnd,
        to server: SessionEnd,
        clientKey: PrivateKey? = nil,
        serverKnowsIt: Bool = true,
        now: NIODeadline
    ) throws -> SessionEnd {
        client.outbox = ByteBuffer()
        server.outbox = ByteBuffer()
        #expect(client.session.detach())
        _ = server.session.detach()
        let key = clientKey ?? self.clientKey
        client.session.reconnect(
            ClientHandshakeStateMachine(
                cipher: .chaChaPoly,
                staticKey: key,
                serverKey: self.serverKey.publicKey,
                parameters: Multiplexer.announcedParameters(for: .init(), features: self.resumable().features)
            ),
            now: now
        )
        let newServer = SessionEnd(
            .server(ServerHandshakeStateMachine(staticKey: self.serverKey, ciphers: [.chaChaPoly])),
            configuration: self.resumable(),
            now: now
        )
        newServer.authorized = [self.clientKey.publicKey, key.publicKey]
        newServer.detached = serverKnowsIt ? [server] : []
        try client.session.start(now: now, wallClock: 1_700_000_000_000_000_000 + 1_000_000_000)
        try newServer.session.start(now: now, wallClock: 0)
        try self.pump(client, newServer, over: MemoryConnection(), now: now)
        return newServer
    }

    @Test func aSessionGoesOnOverANewConnectionWithEveryByteOnceAndInOrder() throws {
        let now = self.t0
        let (client, server, clientStream, serverStream) = try self.resumableEnds(
            client: self.resumable(),
            server: self.resumable(),
            now: now
        )
        let up = bytes(400 << 10, seed: 5)
        let down = bytes(300 << 10, seed: 6)
        client.session.multiplexer!.localRead(up, on: clientStream)
        server.session.multiplexer!.localRead(down, on: serverStream)
        try client.flush(now: now)
        try server.flush(now: now)
        // The connection breaks: a little of the client's records got through, none of the server's.
        var wire = client.outbox
        let length = Int(wire.getInteger(at: wire.readerIndex, as: UInt16.self)!)
        try server.session.received(wire.readSlice(length: 2 + length)!)
        let upBefore = server.streams.delivered[clientStream.id.rawValue]?.count ?? 0
        #expect(upBefore > 0 && upBefore < up.readableBytes)
        let id = try #require(server.session.sessionID)

        let newServer = try self.reconnect(client, to: server, now: now)
        #expect(newServer.session.phase == .closed, "the new connection's own session is spent")
        // From here the client talks to the resumed session.
        try self.pump(client, server, over: MemoryConnection(), now: now)
        #expect(server.resumedReplays.count == 1 && server.resumedReplays[0] >= 1, "the server's records went again")
        #expect(client.resumedReplays.count == 1 && client.resumedReplays[0] >= 3, "and the client's")
        #expect(client.session.sessionID == id && server.session.sessionID == id, "the session keeps its name")
        #expect(client.session.phase == .established && server.session.phase == .established)

        // Every byte arrived once and in order, and the stream goes on over the new connection.
        server.session.multiplexer!.consumed(serverStream.bufferedBytes, on: serverStream, now: now)
        client.session.multiplexer!.consumed(clientStream.bufferedBytes, on: clientStream, now: now)
        let more = bytes(200 << 10, seed: 8)
        client.session.multiplexer!.localRead(more, on: clientStream)
        client.session.multiplexer!.localEndOfStream(on: clientStream)
        server.session.multiplexer!.localEndOfStream(on: serverStream)
        try self.pump(client, server, over: MemoryConnection(), now: now)
        server.session.multiplexer!.consumed(serverStream.bufferedBytes, on: serverStream, now: now)
        try self.pump(client, server, over: MemoryConnection(), now: now)
        #expect(
            server.streams.delivered[clientStream.id.rawValue] ?? []
                == Array(up.readableBytesView) + Array(more.readableBytesView)
        )
        #expect(client.streams.delivered[clientStream.id.rawValue] ?? [] == Array(down.readableBytesView))
        // Both FINs crossed: the stream ended cleanly at both ends.
        #expect(server.streams.events.last == .closed(clientStream.id, nil))
        #expect(client.streams.events.last == .closed(clientStream.id, nil))

        // And it can break and resume again.
        _ = try self.reconnect(client, to: server, now: now)
        try self.pump(client, server, over: MemoryConnection(), now: now)
        #expect(client.resumedReplays.count == 2 && server.resumedReplays.count == 2)
    }

    @Test func anotherClientKeyOrAnUnknownSessionIsRefusedAndTheRealSessionIsUntouched() throws {
        let now = self.t0
        let (client, server, clientStream, _) = try self.resumableEnds(
            client: self.resumable(),
            server: self.resumable(),
            now: now
        )
        // Another client key names the session: the server does not know it for that key. (The test lets
        // that client hold the session's secret: the key alone must stop it.)
        let intruderServer = try self.reconnect(client, to: server, clientKey: PrivateKey(), now: now)
        #expect(client.resumeRefusals == [ResumeStatus.unknown])
        #expect(intruderServer.resumedReplays.isEmpty && server.resumedReplays.isEmpty)
        #expect(server.session.isResumable && server.session.multiplexer?.stream(clientStream.id) != nil)
        #expect(intruderServer.session.phase == .established, "it goes on as a session of its own")
        #expect(client.session.phase == .closed, "a refused client resets its streams")
        #expect(client.streams.events.last == .closed(clientStream.id, .cancel))
    }

    @Test func aServerThatLostTheSessionRefusesAndTheClientResetsItsStreams() throws {
        let now = self.t0
        let (client, server, clientStream, _) = try self.resumableEnds(
            client: self.resumable(),
            server: self.resumable(),
            now: now
        )
        let newServer = try self.reconnect(client, to: server, serverKnowsIt: false, now: now)
        #expect(client.resumeRefusals == [ResumeStatus.unknown])
        #expect(client.streams.events.last == .closed(clientStream.id, .cancel))
        #expect(newServer.session.phase == .established && newServer.confirmedCount == 1)
        #expect(server.resumedReplays.isEmpty)
    }
}
