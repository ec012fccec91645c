import CTUN
import NIOConcurrencyHelpers
import TunnelRuntime

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The addresses of this host's interfaces (4 or 16 bytes each), for the destination policy: a client must not
/// reach the server's own services through an address that is not loopback (`192.0.2.7`, a public address
/// on eth0). Kept current: an rtnetlink socket subscribed to address changes turns readable when one is added
/// or removed, and a lookup re-reads the list when it finds that socket readable. Lookups run per connect and
/// per UDP datagram, so the socket is asked at most once per `checkInterval` (the clock read is the vDSO's
/// coarse clock, no system call): a change takes effect within that time. Without the socket (not Linux), the
/// list is re-read at most once a second.
final class HostAddresses: Sendable {
    private struct State {
        var addresses: Set<[UInt8]> = []
        var watch: Int32
        var lastRead: timespec = timespec()
        var lastCheck: timespec = timespec()
    }

    /// How often, at most, a lookup asks the watch socket whether anything changed.
    static let checkIntervalNanoseconds = 10_000_000

    private let state: NIOLockedValueBox<State>

    init() {
        var state = State(watch: ctun_open_address_watch())
        state.addresses = Self.readInterfaces()
        clock_gettime(CLOCK_MONOTONIC, &state.lastRead)
        self.state = NIOLockedValueBox(state)
    }

    deinit {
        let watch = self.state.withLockedValue { $0.watch }
        if watch >= 0 { close(watch) }
    }

    /// The current addresses (at most `checkIntervalNanoseconds` old). One non-blocking read of the watch socket
    /// when it is asked and nothing changed.
    func current() -> Set<[UInt8]> {
        self.state.withLockedValue { state in
            if state.watch >= 0 {
                var now = timespec()
                clock_gettime(CLOCK_MONOTONIC_COARSE, &now)
                let elapsed =
                    (now.tv_sec - state.lastCheck.tv_sec) * 1_000_000_000 + (now.tv_nsec - state.lastCheck.tv_nsec)
                if elapsed >= 0 && elapsed < Self.checkIntervalNanoseconds { return state.addresses }
                state.lastCheck = now
                let watch = state.watch
                let changed = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 8192) { scratch in
                    var changed = false
                    while true {
                        let count = recv(watch, scratch.baseAddress, scratch.count, Int32(MSG_DONTWAIT))
                        if count > 0 {
                            changed = true
                            continue
                        }
                        // ENOBUFS: notifications were lost; re-read to be safe.
                        if count < 0 && errno == ENOBUFS {
                            changed = true
                            continue
                        }
                        if count < 0 && errno == EINTR { continue }
                        return changed
                    }
                }
                if changed { state.addresses = Self.readInterfaces() }
            } else {
                var now = timespec()
                clock_gettime(CLOCK_MONOTONIC, &now)
                if now.tv_sec - state.lastRead.tv_sec >= 1 {
                    state.addresses = Self.readInterfaces()
                    state.lastRead = now
                }
            }
            return state.addresses
        }
    }

    /// Every IPv4 and IPv6 address of every interface, from getifaddrs(3).
    static func readInterfaces() -> Set<[UInt8]> {
        var addresses: Set<[UInt8]> = []
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return addresses }
        defer { freeifaddrs(first) }
        var current: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = current {
            if let address = entry.pointee.ifa_addr {
                switch Int32(address.pointee.sa_family) {
                case AF_INET:
                    let v4 = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr }
                    addresses.insert(withUnsafeBytes(of: v4) { Array($0) })
                case AF_INET6:
                    let v6 = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                    addresses.insert(withUnsafeBytes(of: v6) { Array($0) })
                default:
                    break
                }
            }
            current = entry.pointee.ifa_next
        }
        return addresses
    }
}
