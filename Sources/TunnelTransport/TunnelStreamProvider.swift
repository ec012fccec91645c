import TunnelProtocol

/// Client side: where a SOCKS connection gets its stream. The runtime's tunnel manager implements it, routing
/// requests to the live tunnel or holding them (bounded) while the tunnel reconnects.
public protocol TunnelStreamProvider: AnyObject {
    /// Opens a stream for `local` to `target`, now or once a tunnel is up. The result arrives exactly once,
    /// through `local.openCompleted`, on the caller's event loop.
    func requestStream(to target: TargetAddress, kind: StreamKind, local: any StreamEndpoint)
    /// The requesting connection went away before its result arrived.
    func cancelStreamRequest(_ local: any StreamEndpoint)
}

extension TunnelStreamProvider {
    /// A TCP stream.
    public func requestStream(to target: TargetAddress, local: any StreamEndpoint) {
        self.requestStream(to: target, kind: .tcp, local: local)
    }
}
