import NIOCore
import NIOPosix
import Testing
import TunnelConfig
import TunnelProtocol

@testable import ServerRuntime

#if canImport(Glibc)
import Glibc
#endif

/// The server's outbound connects to this host's own services (`OutboundConnector.connectHere`), on loopback.
struct OutboundConnectorTests {
    /// A listening socket on 127.0.0.1 with `backlog` (0 queues one connection) and a kernel-chosen port.
    final class Listener: @unchecked Sendable {
        let fd: Int32
        let port: UInt16

        init(backlog: Int32) {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            self.fd = fd
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            _ = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            listen(fd, backlog)
            var bound = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &bound) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            self.port = UInt16(bigEndian: bound.sin_port)
        }

        deinit { close(self.fd) }
    }

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
        let listener = Listener(backlog: 16)
        let connector = Self.connector(pool: pool)
        var target = Self.loopback
        target.port = listener.port
        let outcome = try await connector.connect(to: target, on: group.next()).get()
        guard case .connected(let channel, _) = outcome else {
            Issue.record("expected a connection, got \(outcome)")
            return
        }
        #expect(channel.isActive)
        try await channel.close()
        let closedPort = Listener(backlog: 1)
        target.port = closedPort.port
        close(closedPort.fd)
        let refused = try await connector.connect(to: target, on: group.next()).get()
        guard case .failed(let reply, _) = refused else {
            Issue.record("expected a refusal, got \(refused)")
            return
        }
        #expect(reply == .connectionRefused)
        try await pool.shutdownGracefully()
        try await group.shutdownGracefully()
    }
}
