import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// The one place names are resolved: the system resolver (getaddrinfo), blocking, so callers run it off the
/// event loops (the server's outbound connector on its resolver thread pool; the client once at start).
package enum NameResolution {
    /// Every IPv4 and IPv6 address of `name`, in the resolver's order without duplicates (families this host
    /// has no address of are left out: AI_ADDRCONFIG), or why there is none.
    package static func addresses(of name: String, port: UInt16) -> Result<[SocketAddress], Failure> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_ADDRCONFIG
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(name, String(port), &hints, &result)
        guard rc == 0, let first = result else { return .failure(Failure(reason: String(cString: gai_strerror(rc)))) }
        defer { freeaddrinfo(first) }
        var addresses: [SocketAddress] = []
        var current: UnsafeMutablePointer<addrinfo>? = first
        while let info = current {
            if let sa = info.pointee.ai_addr {
                let address: SocketAddress? =
                    switch Int32(info.pointee.ai_family) {
                    case AF_INET:
                        SocketAddress(
                            sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee },
                            host: name
                        )
                    case AF_INET6:
                        SocketAddress(
                            sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee },
                            host: name
                        )
                    default: nil
                    }
                if let address, !addresses.contains(address) { addresses.append(address) }
            }
            current = info.pointee.ai_next
        }
        guard !addresses.isEmpty else { return .failure(Failure(reason: "no IPv4 or IPv6 address")) }
        return .success(addresses)
    }

    package struct Failure: Error {
        package var reason: String
    }
}
