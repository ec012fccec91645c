import Logging
import NIOCore
import NIOEmbedded
import Testing
import TunnelProtocol

@testable import TunnelTransport

/// A provider that records requests and answers them when told to.
final class FakeProvider: TunnelStreamProvider {
    var requests: [(TargetAddress, LocalStreamHandler)] = []
    var cancelled = 0
    func requestStream(to target: TargetAddress, local: LocalStreamHandler) { self.requests.append((target, local)) }
    func cancelStreamRequest(_ local: LocalStreamHandler) { self.cancelled += 1 }
}

struct SOCKS5ServerHandlerTests {
    func makeChannel() throws -> (EmbeddedChannel, FakeProvider) {
        let provider = FakeProvider()
        let channel = EmbeddedChannel(handler: SOCKS5ServerHandler(provider: provider, logger: Logger(label: "test")))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return (channel, provider)
    }

    func bytes(_ channel: EmbeddedChannel) throws -> [UInt8] {
        var out: [UInt8] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { out += Array(buffer.readableBytesView) }
        return out
    }

    @Test func greetingThenRequestAsksTheProvider() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00]))
        #expect(try self.bytes(channel) == [0x05, 0x00])
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x03, 0x04] + Array("host".utf8) + [0x01, 0xBB]))
        #expect(provider.requests.count == 1)
        #expect(provider.requests.first?.0 == TargetAddress(host: .domain("host"), port: 443))
        #expect(try self.bytes(channel).isEmpty, "no reply before the tunnel answers")
    }

    @Test(arguments: [ReplyCode.connectionRefused, .hostUnreachable, .networkUnreachable, .ttlExpired, .notAllowed, .generalFailure])
    func failedOpenRepliesWithTheCodeAndCloses(reply: ReplyCode) throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 10, 0, 0, 1, 0, 80]))
        _ = try self.bytes(channel)
        let local = try #require(provider.requests.first?.1)
        local.openCompleted(reply: reply, bound: .unspecified)
        #expect(try self.bytes(channel) == [0x05, reply.rawValue, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
        #expect(!channel.isActive)
    }

    @Test func closingWhileWaitingCancelsTheRequest() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 10, 0, 0, 1, 0, 80]))
        try channel.close().wait()
        #expect(provider.cancelled == 1)
    }

    @Test func malformedInputClosesWithoutAskingTheProvider() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x04, 0x01, 0x00, 0x50]))
        #expect(!channel.isActive)
        #expect(provider.requests.isEmpty)
    }

    @Test func earlyDataAfterTheRequestIsKeptForTheStream() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 10, 0, 0, 1, 0, 80, 9, 9, 9]))
        #expect(provider.requests.count == 1)
        #expect(channel.isActive)
        try channel.writeInbound(ByteBuffer(bytes: [UInt8](repeating: 7, count: 5000)))
        #expect(channel.isActive, "early data waits (bounded) for the stream")
    }
}
