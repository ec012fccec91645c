import LocalProxy
import Logging
import NIOCore
import NIOEmbedded
import Testing
import TunnelProtocol

@testable import TunnelTransport

/// A provider that records requests and answers them when told to.
final class FakeProvider: TunnelStreamProvider {
    var requests: [(TargetAddress, any StreamEndpoint)] = []
    var cancelled = 0
    func requestStream(to target: TargetAddress, kind: StreamKind, local: any StreamEndpoint) {
        self.requests.append((target, local))
    }
    func cancelStreamRequest(_ local: any StreamEndpoint) { self.cancelled += 1 }
}

struct LocalProxyHandlerTests {
    func makeChannel(credentials: ProxyCredentials? = nil) throws -> (EmbeddedChannel, FakeProvider) {
        let provider = FakeProvider()
        let handler = LocalProxyHandler(
            provider: provider,
            configuration: LocalProxyHandler.Configuration(credentials: credentials),
            logger: Logger(label: "test")
        )
        let channel = EmbeddedChannel(handler: handler)
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
        try channel.writeInbound(
            ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x03, 0x04] + Array("host".utf8) + [0x01, 0xBB])
        )
        #expect(provider.requests.count == 1)
        #expect(provider.requests.first?.0 == TargetAddress(host: .domain("host"), port: 443))
        #expect(try self.bytes(channel).isEmpty, "no reply before the tunnel answers")
    }

    @Test(arguments: [
        ReplyCode.connectionRefused, .hostUnreachable, .networkUnreachable, .ttlExpired, .notAllowed, .generalFailure,
    ])
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

    /// An application that stops halfway through its handshake is cut at the time limit, and not before.
    @Test func aStalledHandshakeIsClosedAtTheTimeLimit() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00]))
        _ = try self.bytes(channel)
        channel.embeddedEventLoop.advanceTime(by: .seconds(9))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(!channel.isActive)
        #expect(provider.requests.isEmpty)
    }

    /// Once the request is in, the tunnel's own limits decide; the handshake's does not cut the wait.
    @Test func aRequestedStreamIsNotCutByTheHandshakeLimit() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 10, 0, 0, 1, 0, 80]))
        channel.embeddedEventLoop.advanceTime(by: .seconds(30))
        #expect(channel.isActive)
        #expect(provider.cancelled == 0)
    }

    /// A connection that closed during its handshake leaves no timer behind that acts on it later.
    @Test func aClosedHandshakeLeavesNoTimer() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00]))
        try channel.close().wait()
        channel.embeddedEventLoop.advanceTime(by: .seconds(30))
        #expect(provider.cancelled == 0)
    }

    @Test func malformedInputClosesWithoutAskingTheProvider() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x04, 0x01, 0x00, 0x01, 1, 2, 3, 4, 0, 80]))
        #expect(!channel.isActive)
        #expect(provider.requests.isEmpty)
    }

    @Test func earlyDataAfterTheRequestIsKeptForTheStream() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(
            ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x05, 0x01, 0x00, 0x01, 10, 0, 0, 1, 0, 80, 9, 9, 9])
        )
        #expect(provider.requests.count == 1)
        #expect(channel.isActive)
        try channel.writeInbound(ByteBuffer(bytes: [UInt8](repeating: 7, count: 5000)))
        #expect(channel.isActive, "early data waits (bounded) for the stream")
    }

    @Test func socks4aRequestAsksTheProviderAndFailureRepliesRejected() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x04, 0x01, 0x00, 0x50, 0, 0, 0, 1, 0] + Array("host".utf8) + [0]))
        #expect(provider.requests.first?.0 == TargetAddress(host: .domain("host"), port: 80))
        provider.requests.first?.1.openCompleted(reply: .connectionRefused, bound: .unspecified)
        #expect(try self.bytes(channel) == [0, 0x5B, 0, 0, 0, 0, 0, 0])
        #expect(!channel.isActive)
    }

    @Test func httpConnectAsksTheProviderAndFailureIsA502() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(
            ByteBuffer(string: "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        )
        #expect(provider.requests.first?.0 == TargetAddress(host: .domain("example.com"), port: 443))
        provider.requests.first?.1.openCompleted(reply: .hostUnreachable, bound: .unspecified)
        let response = String(decoding: try self.bytes(channel), as: UTF8.self)
        #expect(response.hasPrefix("HTTP/1.1 502 Bad Gateway"))
        #expect(!channel.isActive)
    }

    @Test func httpTimeoutIsA504() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(string: "CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n"))
        provider.requests.first?.1.openCompleted(reply: .ttlExpired, bound: .unspecified)
        #expect(String(decoding: try self.bytes(channel), as: UTF8.self).hasPrefix("HTTP/1.1 504"))
    }

    @Test func httpWithoutCredentialsIs407() throws {
        let (channel, provider) = try self.makeChannel(credentials: ProxyCredentials(username: "u", password: "p"))
        try channel.writeInbound(ByteBuffer(string: "CONNECT h:1 HTTP/1.1\r\n\r\n"))
        let response = String(decoding: try self.bytes(channel), as: UTF8.self)
        #expect(response.hasPrefix("HTTP/1.1 407"))
        #expect(response.contains("Proxy-Authenticate: Basic"))
        #expect(provider.requests.isEmpty)
    }

    @Test func malformedHTTPIs400() throws {
        let (channel, _) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(string: "GARBAGE\r\n\r\n"))
        #expect(String(decoding: try self.bytes(channel), as: UTF8.self).hasPrefix("HTTP/1.1 400"))
        #expect(!channel.isActive)
    }

    @Test func unknownFirstByteCloses() throws {
        let (channel, provider) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x16, 0x03, 0x01]))
        #expect(!channel.isActive)
        #expect(provider.requests.isEmpty)
    }

    @Test func udpAssociateWithoutARelayIsNotSupported() throws {
        let (channel, _) = try self.makeChannel()
        try channel.writeInbound(ByteBuffer(bytes: [0x05, 0x01, 0x00, 0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0]))
        #expect(try self.bytes(channel) == [0x05, 0x00, 0x05, 0x07, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
    }
}
