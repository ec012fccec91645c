import NIOCore
import NIOPosix
import Testing
import TunnelRuntime

#if canImport(Glibc)
import Glibc
#endif

/// The client's own connect: Happy Eyeballs over a server's addresses (RFC 8305), on loopback only. The
/// dialer blocks (poll), so each test runs it on a thread pool: a test that blocks Swift's cooperative
/// threads (two on a two-core machine) stalls every other test awaiting at the same time.
struct DialerTests {
    /// Runs `body` (which blocks) on the thread pool.
    static func blocking<T: Sendable>(_ body: @escaping @Sendable () -> T) async throws -> T {
        try await NIOThreadPool.singleton.runIfActive(body)
    }

    /// A listening TCP socket on 127.0.0.1 with a kernel-chosen port.
    final class Listener: @unchecked Sendable {
        let fd: Int32
        let port: Int

        init() {
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
            listen(fd, 16)
            var bound = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &bound) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            self.port = Int(UInt16(bigEndian: bound.sin_port))
        }

        var address: SocketAddress { try! SocketAddress(ipAddress: "127.0.0.1", port: self.port) }

        private var open = true

        /// Stops listening: a connect to the port is refused from now on.
        func stop() {
            guard self.open else { return }
            self.open = false
            close(self.fd)
        }

        deinit {
            self.stop()
        }
    }

    @Test func addressesAlternateByFamilyStartingWithTheFirst() throws {
        let v6a = try SocketAddress(ipAddress: "2001:db8::1", port: 1)
        let v6b = try SocketAddress(ipAddress: "2001:db8::2", port: 1)
        let v4a = try SocketAddress(ipAddress: "192.0.2.1", port: 1)
        let v4b = try SocketAddress(ipAddress: "192.0.2.2", port: 1)
        #expect(Dialer.interleaved([v6a, v6b, v4a, v4b]) == [v6a, v4a, v6b, v4b])
        #expect(Dialer.interleaved([v4a, v6a, v6b]) == [v4a, v6a, v6b])
        #expect(Dialer.interleaved([]) == [])
    }

    @Test func connectsToAListenerAndReportsARefusal() async throws {
        let listener = Listener()
        let port = listener.port
        let connected = try await Self.blocking {
            Dialer.connect(host: "127.0.0.1", port: UInt16(port), timeout: .seconds(2))
        }
        guard case .success(let connection) = connected else {
            Issue.record("no connection")
            return
        }
        #expect(connection.address.port == port)
        close(connection.descriptor)

        listener.stop()
        let closed = try SocketAddress(ipAddress: "127.0.0.1", port: port)
        let refused = try await Self.blocking { Dialer.connect(to: [closed], timeout: .seconds(2)) }
        guard case .failure(let failure) = refused else {
            Issue.record("connected to a closed port")
            return
        }
        #expect(failure.description.contains("refused"))
    }

    /// A first address that fails (refused) does not hold the connection up: the next attempt starts at once,
    /// not after the attempt delay.
    @Test func aFailedAddressStartsTheNextAttemptAtOnce() async throws {
        let closed = Listener()
        let refusing = closed.address
        closed.stop()
        let good = Listener()
        let goodAddress = good.address
        let (result, elapsed) = try await Self.blocking {
            let start = NIODeadline.now()
            let result = Dialer.connect(to: [refusing, goodAddress], timeout: .seconds(10), attemptDelay: .seconds(5))
            return (result, NIODeadline.now() - start)
        }
        guard case .success(let connection) = result else {
            Issue.record("no connection: \(result)")
            return
        }
        #expect(connection.address == goodAddress)
        #expect(elapsed < .seconds(4), "it did not wait out the 5 s attempt delay")
        close(connection.descriptor)
        withExtendedLifetime(good) {}

        // Nothing to try, and no time to try it.
        guard case .failure(let none) = Dialer.connect(to: [], timeout: .seconds(1)) else {
            Issue.record("connected to nothing")
            return
        }
        #expect(none.description == "no address to connect to")
        guard case .failure(let late) = Dialer.connect(to: [goodAddress], timeout: .zero) else {
            Issue.record("connected in no time")
            return
        }
        #expect(late.description == "connect timed out")
    }
}
