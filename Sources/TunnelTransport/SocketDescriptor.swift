import NIOCore
import TunnelEventLoop

#if canImport(Glibc)
import Glibc
#endif

/// Finds the descriptor of one of this process's connected TCP sockets from its two addresses, which name
/// exactly one open TCP connection. SwiftNIO does not hand out its channels' descriptors; the tunnel
/// connection uses this once per connection to write records with send(2) itself (see
/// `TunnelConnectionHandler.enableDirectWrites()`). Linux only: it lists /proc/self/fd.
enum SocketDescriptor {
    /// The descriptor whose local and peer addresses are `local` and `remote`, or nil. Costs one
    /// `getsockname` per open descriptor, and more only for the one that matches.
    static func find(local: SocketAddress, remote: SocketAddress) -> Int32? {
        #if os(Linux)
        guard let directory = opendir("/proc/self/fd") else { return nil }
        defer { closedir(directory) }
        let own = dirfd(directory)
        while let entry = readdir(directory) {
            let descriptor = withUnsafeBytes(of: entry.pointee.d_name) { name -> Int32? in
                var value: Int32 = 0
                for byte in name {
                    if byte == 0 { break }
                    guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9"), value < Int32.max / 10 - 9 else {
                        return nil
                    }
                    value = value * 10 + Int32(byte - UInt8(ascii: "0"))
                }
                return name.first == 0 ? nil : value
            }
            guard let descriptor, descriptor != own else { continue }
            if (try? SocketAddresses.of(descriptor, peer: false)) == local,
                (try? SocketAddresses.of(descriptor, peer: true)) == remote,
                Self.isStream(descriptor)
            {
                return descriptor
            }
        }
        #endif
        return nil
    }

    private static func isStream(_ descriptor: Int32) -> Bool {
        var type: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        return getsockopt(descriptor, SOL_SOCKET, SO_TYPE, &type, &length) == 0 && type == Int32(SOCK_STREAM.rawValue)
    }
}
