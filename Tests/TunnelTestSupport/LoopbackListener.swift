import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// A listening TCP socket on 127.0.0.1 with a kernel-chosen port, for tests of our own connects. A backlog
/// of 0 queues one connection: the next SYN is dropped until `accept` makes room.
public final class LoopbackListener: @unchecked Sendable {
    public let fd: Int32
    public let port: Int
    private var open = true

    public init(backlog: Int32 = 16) {
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
        self.port = Int(UInt16(bigEndian: bound.sin_port))
    }

    public var address: SocketAddress { try! SocketAddress(ipAddress: "127.0.0.1", port: self.port) }

    /// Stops listening: a connect to the port is refused from now on.
    public func stop() {
        guard self.open else { return }
        self.open = false
        close(self.fd)
    }

    deinit {
        self.stop()
    }
}
