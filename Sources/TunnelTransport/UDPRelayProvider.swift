import Logging
import NIOCore
import TunnelProtocol

/// Serves SOCKS5 UDP ASSOCIATE (RFC 1928 §7) for the local proxy: binds a relay, answers on the control
/// connection, and keeps the association for as long as that connection lives.
public protocol UDPRelayProvider: AnyObject, Sendable {
    /// Takes over `control` (its SOCKS5 request already read): answers with the relay's address or a failure.
    /// `announced` is where the application said its datagrams would come from (zeros if unknown).
    func associate(control: any Channel, announced: TargetAddress, logger: Logger)
}
