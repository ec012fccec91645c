import NIOCore
import Testing

@testable import TunnelProtocol

/// Early data (feature bit 4, docs/PROTOCOL.md §3.3): a TCP stream opened with `early` is open on the client at
/// once and its first bytes (and FIN) follow the OPEN; the server holds them until it answers.
struct EarlyDataTests {
    static var early: Multiplexer.Configuration {
        var config = Multiplexer.Configuration()
        config.earlyData = true
        return config
    }

    static let target = TargetAddress(host: .domain("example.com"), port: 443)
    static let bound = TargetAddress(host: .ipv4(0x7F00_0001), port: 5555)

    @Test func theFirstBytesFollowTheOpenInTheSameRecordAndWaitAtTheServerForItsAnswer() throws {
        let pair = MuxPair(client: Self.early, server: Self.early)
        let stream = try #require(pair.client.openStream(to: Self.target, early: true))
        #expect(stream.state == .open && stream.awaitingOpenResult)
        pair.client.localRead(bytes(300), on: stream)
        let records = MuxPair.produce(pair.client)
        #expect(records.count == 1, "OPEN and DATA in one record")
        var record = try #require(records.first)
        #expect(try record.readFrame()?.header.type == .open)
        #expect(try record.readFrame()?.header.type == .data)
        for var record in records { _ = try pair.server.receivedRecord(&record, now: pair.now) }
        #expect(pair.serverEvents.take() == [.openRequested(stream.id, Self.target)], "held until it opens")
        let accepted = try #require(pair.server.stream(stream.id))
        #expect(accepted.state == .opening && accepted.bufferedBytes == 300)

        pair.server.completeOpen(accepted, reply: .succeeded, bound: Self.bound)
        #expect(accepted.state == .open)
        #expect(pair.serverEvents.take() == [.received(stream.id, Array(bytes(300).readableBytesView))])
        try pair.pump()
        #expect(pair.clientEvents.take() == [.openCompleted(stream.id, .succeeded, Self.bound)])
        #expect(!stream.awaitingOpenResult)
        // The server's window counted the early bytes as sent.
        #expect(stream.availableSendCredit == Multiplexer.Configuration().initialStreamWindow - 300)
        // Data flows both ways as on any stream.
        pair.server.localRead(bytes(100, seed: 9), on: accepted)
        try pair.pump()
        #expect(pair.clientEvents.delivered[stream.id.rawValue] == Array(bytes(100, seed: 9).readableBytesView))
    }

    @Test func earlyBytesStopAtTheEarlyWindowUntilTheAnswerGivesMore() throws {
        let pair = MuxPair(client: Self.early, server: Self.early)
        let stream = try #require(pair.client.openStream(to: Self.target, early: true))
        pair.client.localRead(bytes(100_000), on: stream)
        #expect(!pair.client.shouldRead(stream), "no more reading past the early window")
        try pair.pump()
        let accepted = try #require(pair.server.stream(stream.id))
        #expect(accepted.bufferedBytes == WireLimits.earlyDataWindow)
        pair.server.completeOpen(accepted, reply: .succeeded, bound: Self.bound)
        try pair.pump()
        #expect(pair.serverEvents.delivered[stream.id.rawValue] == Array(bytes(100_000).readableBytesView))
    }

    @Test func theOpenersFINBeforeTheAnswerHalfClosesTheStreamWhenItOpens() throws {
        let pair = MuxPair(client: Self.early, server: Self.early)
        let stream = try #require(pair.client.openStream(to: Self.target, early: true))
        pair.client.localRead(bytes(10), on: stream)
        pair.client.localEndOfStream(on: stream)
        try pair.pump()
        #expect(stream.state == .halfClosedLocal)
        let accepted = try #require(pair.server.stream(stream.id))
        #expect(accepted.state == .opening && accepted.finReceived)
        _ = pair.serverEvents.take()
        pair.server.completeOpen(accepted, reply: .succeeded, bound: Self.bound)
        #expect(accepted.state == .halfClosedRemote)
        #expect(
            pair.serverEvents.take() == [
                .received(stream.id, Array(bytes(10).readableBytesView)), .endOfStream(stream.id),
            ]
        )
        pair.server.localEndOfStream(on: accepted)
        try pair.pump()
        #expect(stream.state.isClosed && accepted.state.isClosed)
    }

    @Test func aFailedOpenAfterEarlyDataResetsTheStreamWithItsReplyAndFreesWhatTheServerHeld() throws {
        let pair = MuxPair(client: Self.early, server: Self.early)
        let stream = try #require(pair.client.openStream(to: Self.target, early: true))
        pair.client.localRead(bytes(5000), on: stream)
        try pair.pump()
        let accepted = try #require(pair.server.stream(stream.id))
        _ = pair.clientEvents.take()
        pair.server.completeOpen(accepted, reply: .connectionRefused, bound: .unspecified)
        try pair.pump()
        #expect(
            pair.clientEvents.take().prefix(2)
                == [.openCompleted(stream.id, .connectionRefused, .unspecified), .closed(stream.id, .refusedStream)]
        )
        #expect(stream.state == .closed(reset: .refusedStream))
        pair.client.release(stream)
        #expect(pair.server.stream(stream.id) == nil)
        #expect(pair.server.bufferedReceiveBytes == 0, "the early bytes the server held are gone with the stream")
    }

    @Test func theAppClosingBeforeTheAnswerResetsAndALateAnswerIsIgnored() throws {
        let pair = MuxPair(client: Self.early, server: Self.early)
        let stream = try #require(pair.client.openStream(to: Self.target, early: true))
        pair.client.localRead(bytes(10), on: stream)
        try pair.pump()
        pair.client.release(stream)  // the application went away
        try pair.pump()
        let accepted = try #require(pair.server.stream(stream.id))
        #expect(accepted.state == .closed(reset: .cancel))
        pair.server.completeOpen(accepted, reply: .succeeded, bound: Self.bound)
        _ = pair.clientEvents.take()
        try pair.pump()
        #expect(pair.clientEvents.take().isEmpty)
    }

    @Test func withoutTheFeatureAStreamWaitsForItsAnswerAndEarlyDataIsAProtocolError() throws {
        let pair = MuxPair(client: Self.early, server: Multiplexer.Configuration())
        // The client asked, but a mux without the feature opens as before.
        let plain = MuxPair()
        let stream = try #require(plain.client.openStream(to: Self.target, early: true))
        #expect(stream.state == .opening && !stream.awaitingOpenResult)
        // A client that sends early anyway to a server that did not grant it breaks the protocol.
        let rogue = try #require(pair.client.openStream(to: Self.target, early: true))
        pair.client.localRead(bytes(10), on: rogue)
        #expect(throws: ProtocolError.self) { try pair.pump() }
    }

    @Test func aGoAwayFailsEarlyStreamsThePeerNeverSaw() throws {
        let pair = MuxPair(client: Self.early, server: Self.early)
        let seen = try #require(pair.client.openStream(to: Self.target, early: true))
        try pair.pump()
        pair.server.goAway(code: .noError)
        let unseen = try #require(pair.client.openStream(to: Self.target, early: true))
        for var record in MuxPair.produce(pair.server) { _ = try pair.client.receivedRecord(&record, now: pair.now) }
        #expect(unseen.state == .closed(reset: .refusedStream))
        #expect(seen.state == .open && seen.awaitingOpenResult)
    }

    @Test func theAcceptorsWindowIsNeverBelowTheEarlyWindow() {
        var config = Self.early
        config.initialStreamWindow = 16 << 10
        let mux = Multiplexer(role: .server, configuration: config, peerParameters: SessionParameters())
        #expect(mux.initialWindow(for: .tcp) == WireLimits.earlyDataWindow)
    }
}
