import NIOCore
import TunnelProtocol

/// Records what a multiplexer asks of its I/O side, and plays the local sockets of the streams.
final class RecordingDelegate: MultiplexerDelegate {
    enum Event: Equatable {
        case openRequested(StreamID, TargetAddress)
        case openCompleted(StreamID, ReplyCode, TargetAddress)
        case received(StreamID, [UInt8])
        case endOfStream(StreamID)
        case closed(StreamID, ErrorCode?)
        case wantsRead(StreamID)
        case goingAway(StreamID, ErrorCode)
    }

    var events: [Event] = []
    var outputSignals = 0
    /// IP packets and CONTROL payloads received (full tunnel).
    var packets: [[UInt8]] = []
    var controls: [[UInt8]] = []
    /// Bytes delivered per stream (what the local socket received).
    var delivered: [UInt32: [UInt8]] = [:]

    func multiplexer(_ mux: Multiplexer, openRequested stream: MuxStream) {
        self.events.append(.openRequested(stream.id, stream.target))
    }
    func multiplexer(_ mux: Multiplexer, openCompleted stream: MuxStream, reply: ReplyCode, bound: TargetAddress) {
        self.events.append(.openCompleted(stream.id, reply, bound))
    }
    func multiplexer(_ mux: Multiplexer, received data: ByteBuffer, on stream: MuxStream) {
        self.events.append(.received(stream.id, Array(data.readableBytesView)))
        self.delivered[stream.id.rawValue, default: []] += Array(data.readableBytesView)
    }
    func multiplexer(_ mux: Multiplexer, receivedEndOfStream stream: MuxStream) {
        self.events.append(.endOfStream(stream.id))
    }
    func multiplexer(_ mux: Multiplexer, streamClosed stream: MuxStream, reset: ErrorCode?) {
        self.events.append(.closed(stream.id, reset))
    }
    func multiplexer(_ mux: Multiplexer, streamWantsRead stream: MuxStream) {
        self.events.append(.wantsRead(stream.id))
    }
    func multiplexer(_ mux: Multiplexer, peerGoingAway lastStreamID: StreamID, code: ErrorCode) {
        self.events.append(.goingAway(lastStreamID, code))
    }
    func multiplexerHasOutput(_ mux: Multiplexer) {
        self.outputSignals += 1
    }
    func multiplexer(_ mux: Multiplexer, receivedIPPacket packet: ByteBuffer) {
        self.packets.append(Array(packet.readableBytesView))
    }
    func multiplexer(_ mux: Multiplexer, receivedControl payload: ByteBuffer) throws(ProtocolError) {
        self.controls.append(Array(payload.readableBytesView))
    }

    func take() -> [Event] {
        defer { self.events.removeAll() }
        return self.events
    }
}

/// A client and a server multiplexer wired back to back through record plaintexts (no crypto, no sockets).
final class MuxPair {
    let client: Multiplexer
    let server: Multiplexer
    let clientEvents = RecordingDelegate()
    let serverEvents = RecordingDelegate()
    var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
    /// Records produced but not yet delivered, per direction.
    var toServer: [ByteBuffer] = []
    var toClient: [ByteBuffer] = []

    init(
        client clientConfig: Multiplexer.Configuration = .init(),
        server serverConfig: Multiplexer.Configuration = .init()
    ) {
        self.client = Multiplexer(
            role: .client,
            configuration: clientConfig,
            peerParameters: Multiplexer.announcedParameters(for: serverConfig)
        )
        self.server = Multiplexer(
            role: .server,
            configuration: serverConfig,
            peerParameters: Multiplexer.announcedParameters(for: clientConfig)
        )
        self.client.delegate = self.clientEvents
        self.server.delegate = self.serverEvents
    }

    /// Drains one side's output into records (as the handler would).
    static func produce(
        _ mux: Multiplexer,
        limit: Int = WireLimits.maxRecordFrameBytes,
        now: NIODeadline = .uptimeNanoseconds(1_000_000_000)
    ) -> [ByteBuffer] {
        var records: [ByteBuffer] = []
        while true {
            var buffer = ByteBuffer()
            guard mux.produceRecord(into: &buffer, limit: limit, now: now) else { break }
            records.append(buffer)
        }
        return records
    }

    /// Moves everything each side has to send to the other, until both are quiet.
    func pump(maxRounds: Int = 100) throws {
        for _ in 0..<maxRounds {
            let forServer = Self.produce(self.client, now: self.now)
            let forClient = Self.produce(self.server, now: self.now)
            if forServer.isEmpty && forClient.isEmpty { return }
            for var record in forServer { _ = try self.server.receivedRecord(&record, now: self.now) }
            for var record in forClient { _ = try self.client.receivedRecord(&record, now: self.now) }
        }
    }

    /// Opens a client stream and has the server accept it.
    func openAccepted(
        _ target: TargetAddress = TargetAddress(host: .domain("example.com"), port: 443)
    ) throws -> (MuxStream, MuxStream) {
        let clientStream = self.client.openStream(to: target)!
        try self.pump()
        let serverStream = self.server.stream(clientStream.id)!
        self.server.completeOpen(
            serverStream,
            reply: .succeeded,
            bound: TargetAddress(host: .ipv4(0x7F00_0001), port: 5555)
        )
        try self.pump()
        _ = self.clientEvents.take()
        _ = self.serverEvents.take()
        return (clientStream, serverStream)
    }
}

func bytes(_ count: Int, seed: UInt8 = 1) -> ByteBuffer {
    var buffer = ByteBuffer()
    buffer.writeBytes((0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) })
    return buffer
}
