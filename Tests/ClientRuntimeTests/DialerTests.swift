import NIOCore
import NIOPosix
import Testing
import TunnelRuntime
import TunnelTestSupport

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

    typealias Listener = LoopbackListener

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

    // MARK: - The non-blocking connect under the dialer and the server's local connects

    /// A connect to this host ends within connect(2): connected, or refused, by the first look.
    @Test func aLocalConnectEndsWithinTheCall() throws {
        let listener = Listener()
        var state = NonBlockingConnect.start(listener.address)
        if case .pending(let fd) = state { state = NonBlockingConnect.check(fd) }
        guard case .connected(let fd) = state else {
            Issue.record("expected connected, got \(state)")
            return
        }
        close(fd)
        listener.stop()
        var refused = NonBlockingConnect.start(listener.address)
        if case .pending(let fd) = refused { refused = NonBlockingConnect.check(fd) }
        #expect(refused == .failed(ECONNREFUSED))
    }

    /// A listener whose queue is full drops the SYN: the connect stays pending until the kernel's retry
    /// finds room, and a look in between neither blocks nor ends it.
    @Test func aConnectToAFullQueueStaysPendingUntilThereIsRoom() async throws {
        let listener = Listener(backlog: 0)
        var first = NonBlockingConnect.start(listener.address)
        if case .pending(let fd) = first { first = NonBlockingConnect.check(fd) }
        guard case .connected(let firstFD) = first else {
            Issue.record("expected the first connect to be queued, got \(first)")
            return
        }
        defer { close(firstFD) }
        var second = NonBlockingConnect.start(listener.address)
        if case .pending(let fd) = second { second = NonBlockingConnect.check(fd) }
        guard case .pending(let fd) = second else {
            Issue.record("expected pending while the queue is full, got \(second)")
            if case .connected(let fd) = second { close(fd) }
            return
        }
        // Room in the queue: the kernel's SYN retry (after about a second) gets through.
        let accepted = accept(listener.fd, nil, nil)
        #expect(accepted >= 0)
        defer { close(accepted) }
        let deadline = NIODeadline.now() + .seconds(5)
        var state = NonBlockingConnect.State.pending(fd)
        while case .pending = state, NIODeadline.now() < deadline {
            try await Task.sleep(for: .milliseconds(20))
            state = NonBlockingConnect.check(fd)
        }
        #expect(state == .connected(fd))
        close(fd)
    }
}
