import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
import TunnelConfig
import TunnelProtocol
import TunnelTestSupport

@testable import ServerRuntime

/// The server's outbound connects to this host's own services (`OutboundConnector.connectHere`), on loopback.
struct OutboundConnectorTests {
    static func connector(pool: NIOThreadPool) -> OutboundConnector {
        OutboundConnector(
            connectTimeout: .seconds(10),
            policy: DestinationPolicy(allow: [CIDR.parse("127.0.0.0/8")!]),
            hostAddresses: HostAddresses(),
            resolverPool: pool
        )
    }

    static let loopback = TargetAddress(host: .ipv4(0x7F00_0001), port: 0)

    @Test func aLocalServiceIsConnectedAtOnceAndAClosedPortRefused() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let listener = LoopbackListener()
        let connector = Self.connector(pool: pool)
        var target = Self.loopback
        target.port = UInt16(listener.port)
        let outcome = try await connector.connect(to: target, on: group.next()).get()
        guard case .connected(let channel, _) = outcome else {
            Issue.record("expected a connection, got \(outcome)")
            return
        }
        #expect(channel.isActive)
        try await channel.close()
        let closedPort = LoopbackListener()
        target.port = UInt16(closedPort.port)
        closedPort.stop()
        let refused = try await connector.connect(to: target, on: group.next()).get()
        guard case .failed(let reply, _) = refused else {
            Issue.record("expected a refusal, got \(refused)")
            return
        }
        #expect(reply == .connectionRefused)
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
    }

    /// A local connect still waiting for room in the service's queue when the server's event loops stop ends
    /// (as a failure, its socket closed) instead of being left unanswered.
    @Test func aPendingLocalConnectEndsWhenTheEventLoopStops() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let listener = LoopbackListener(backlog: 0)
        let connector = Self.connector(pool: pool)
        var target = Self.loopback
        target.port = UInt16(listener.port)
        // The first fills the queue; the second waits for room.
        let first = try await connector.connect(to: target, on: group.next()).get()
        guard case .connected(let channel, _) = first else {
            Issue.record("expected the first connect to be queued, got \(first)")
            return
        }
        let ended = NIOLockedValueBox<OutboundConnector.Outcome?>(nil)
        connector.connect(to: target, on: group.next()).whenSuccess { outcome in
            ended.withLockedValue { $0 = outcome }
        }
        try await Task.sleep(for: .milliseconds(100))
        #expect(ended.withLockedValue { $0 } == nil, "still waiting for room")
        try await channel.close()
        try await group.shutdownGracefully()
        guard case .failed(let reply, _) = ended.withLockedValue({ $0 }) else {
            Issue.record("the pending connect was left unanswered")
            return
        }
        #expect(reply == .generalFailure)
        try await pool.shutdownGracefully()
    }
}
