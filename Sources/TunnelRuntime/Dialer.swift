import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Connects a TCP socket of our own to a host, racing its addresses as Happy Eyeballs does (RFC 8305): the
/// resolver's addresses interleaved by family, a new attempt every `attemptDelay` while earlier ones are
/// still pending (at once when one fails), the first to connect wins and the rest are closed. The caller
/// hands the connected descriptor to NIO (`ClientBootstrap.withConnectedSocket`), and so knows it without
/// searching the process's descriptors for it.
///
/// Blocking (getaddrinfo, then poll(2) on the attempts): run it on a thread pool, never on an event loop.
package enum Dialer {
    /// A connected, non-blocking socket and the address it reached.
    package struct Connection: Sendable {
        package var descriptor: Int32
        package var address: SocketAddress
    }

    package struct Failure: Error, CustomStringConvertible, Sendable {
        package var description: String
    }

    /// The connection attempt delay RFC 8305 §8 recommends.
    package static let attemptDelay: TimeAmount = .milliseconds(250)

    /// RFC 8305 §4: the addresses in the resolver's order (which follows RFC 6724), regrouped so the families
    /// alternate, starting with the family of the first one.
    package static func interleaved(_ addresses: [SocketAddress]) -> [SocketAddress] {
        guard let first = addresses.first else { return [] }
        let isFirstFamily = { (address: SocketAddress) in address.protocol == first.protocol }
        var preferred = addresses.filter(isFirstFamily)[...]
        var other = addresses.filter { !isFirstFamily($0) }[...]
        var out: [SocketAddress] = []
        out.reserveCapacity(addresses.count)
        while !preferred.isEmpty || !other.isEmpty {
            if let next = preferred.popFirst() { out.append(next) }
            if let next = other.popFirst() { out.append(next) }
        }
        return out
    }

    /// Resolves `host` and connects to `port` on the first of its addresses that answers within `timeout`.
    package static func connect(
        host: String,
        port: UInt16,
        timeout: TimeAmount,
        attemptDelay: TimeAmount = Self.attemptDelay
    ) -> Result<Connection, Failure> {
        switch NameResolution.addresses(of: host, port: port) {
        case .failure(let failure):
            return .failure(Failure(description: "cannot resolve \(host): \(failure.reason)"))
        case .success(let addresses):
            return Self.connect(to: Self.interleaved(addresses), timeout: timeout, attemptDelay: attemptDelay)
        }
    }

    /// Races connections to `addresses` in this order.
    package static func connect(
        to addresses: [SocketAddress],
        timeout: TimeAmount,
        attemptDelay: TimeAmount = Self.attemptDelay
    ) -> Result<Connection, Failure> {
        let deadline = NIODeadline.now() + timeout
        var pending: [(descriptor: Int32, address: SocketAddress)] = []
        var next = 0
        var nextStart = NIODeadline.now()
        var lastError = "no address to connect to"
        defer { for attempt in pending { close(attempt.descriptor) } }
        while true {
            let now = NIODeadline.now()
            if now >= deadline { return .failure(Failure(description: "connect timed out")) }
            // Start the next attempt when its time has come, or at once when none is pending.
            while next < addresses.count && (pending.isEmpty || now >= nextStart) {
                let address = addresses[next]
                next += 1
                nextStart = now + attemptDelay
                switch NonBlockingConnect.start(address) {
                case .connected(let descriptor):
                    return .success(Connection(descriptor: descriptor, address: address))
                case .pending(let descriptor):
                    pending.append((descriptor, address))
                case .failed(let error):
                    lastError = Self.describe(errno: error)
                }
            }
            if pending.isEmpty { return .failure(Failure(description: lastError)) }
            var fds = pending.map { pollfd(fd: $0.descriptor, events: Int16(POLLOUT), revents: 0) }
            let until = next < addresses.count ? min(deadline, nextStart) : deadline
            let wait = max(0, Int32(clamping: (until - now).nanoseconds / 1_000_000 + 1))
            let ready = poll(&fds, nfds_t(fds.count), wait)
            if ready < 0 && errno != EINTR { return .failure(Failure(description: Self.describe(errno: errno))) }
            guard ready > 0 else { continue }
            // Failed attempts leave; the first that connected wins.
            var index = fds.count - 1
            while index >= 0 {
                defer { index -= 1 }
                guard fds[index].revents != 0 else { continue }
                let attempt = pending.remove(at: index)
                let error = NonBlockingConnect.error(of: attempt.descriptor)
                if error == 0 { return .success(Connection(descriptor: attempt.descriptor, address: attempt.address)) }
                close(attempt.descriptor)
                lastError = Self.describe(errno: error)
            }
            // A failure starts the next attempt at once (RFC 8305 §5).
            if pending.isEmpty { nextStart = .now() }
        }
    }

    static func describe(errno code: Int32) -> String {
        "\(String(cString: strerror(code))) (errno \(code))"
    }
}
