import NIOCore
import TunnelProtocol

extension SocketAddress {
    /// The address as 4 or 16 bytes.
    public var packedBytes: [UInt8]? {
        switch self {
        case .v4(let a):
            return withUnsafeBytes(of: a.address.sin_addr) { Array($0) }
        case .v6(let a):
            return withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
        default:
            return nil
        }
    }

    /// The address as 4 or 16 bytes, an IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer) as IPv4.
    public var unmappedBytes: [UInt8]? { self.packedBytes.map(IPAddress.unmapped) }

    /// `1.2.3.4:5` or `[::1]:5`, for logs.
    public var hostPortDescription: String {
        guard let host = self.ipAddress, let port = self.port else { return self.description }
        return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}
