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
    /// A connector on one event loop, and a loopback listener to connect to.
    struct Fixture {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let pool = NIOThreadPool(numberOfThreads: 1)
        let listener: LoopbackListener
        let connector: OutboundConnector
        var target = TargetAddress(host: .ipv4(0x7F00_0001), port: 0)

        init(backlog: Int32 = 16) {
            self.pool.start()
            self.listener = LoopbackListener(backlog: backlog)
            self.connector = OutboundConnector(
                connectTimeout: .seconds(10),
                policy: DestinationPolicy(allow: [CIDR.parse("127.0.0.0/8")!]),
                hostAddresses: HostAddresses(),
                resolverPool: self.pool
            )
            self.target.port = UInt16(self.listener.port)
        }

        /// Connects to `target` from the fixture's event loop; the outcome as a future.
        func connect(to target: TargetAddress) -> EventLoopFuture<OutboundConnector.Outcome> {
            let loop = self.group.next()
            let promise = loop.makePromise(of: OutboundConnector.Outcome.self)
            let connector = self.connector
            loop.execute { connector.connect(to: target, on: loop) { promise.succeed($0) } }
            return promise.futureResult
        }
    }

    @Test func aLocalServiceIsConnectedAtOnceAndAClosedPortRefused() async throws {
        var fixture = Fixture()
        let outcome = try await fixture.connect(to: fixture.target).get()
        guard case .connected(let channel, _) = outcome else {
            Issue.record("expected a connection, got \(outcome)")
            return
        }
        #expect(channel.isActive)
        try await channel.close()
        let closedPort = LoopbackListener()
        fixture.target.port = UInt16(closedPort.port)
        closedPort.stop()
        let refused = try await fixture.connect(to: fixture.target).get()
        guard case .failed(let reply, _) = refused else {
            Issue.record("expected a refusal, got \(refused)")
            return
        }
        #expect(reply == .connectionRefused)
        try await fixture.pool.shutdownGracefully()
        try await fixture.group.shutdownGracefully()
    }

    /// A local connect still waiting for room in the service's queue when the server's event loops stop ends
    /// (as a failure, its socket closed) instead of being left unanswered.
    @Test func aPendingLocalConnectEndsWhenTheEventLoopStops() async throws {
        let fixture = Fixture(backlog: 0)
        // The first fills the queue; the second waits for room.
        let first = try await fixture.connect(to: fixture.target).get()
        guard case .connected(let channel, _) = first else {
            Issue.record("expected the first connect to be queued, got \(first)")
            return
        }
        let ended = NIOLockedValueBox<OutboundConnector.Outcome?>(nil)
        fixture.connect(to: fixture.target).whenSuccess { outcome in
            ended.withLockedValue { $0 = outcome }
        }
        try await Task.sleep(for: .milliseconds(100))
        #expect(ended.withLockedValue { $0 } == nil, "still waiting for room")
        try await channel.close()
        try await fixture.group.shutdownGracefully()
        guard case .failed(let reply, _) = ended.withLockedValue({ $0 }) else {
            Issue.record("the pending connect was left unanswered")
            return
        }
        #expect(reply == .generalFailure)
        try await fixture.pool.shutdownGracefully()
    }
}
