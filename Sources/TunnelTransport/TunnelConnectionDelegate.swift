import NIOCore
import TunnelCrypto
import TunnelProtocol

/// What a tunnel connection reports to the runtime that owns it. Called on the connection's event loop.
public protocol TunnelConnectionDelegate: AnyObject {
    /// Server: whether a client key may connect (checked before the handshake finishes).
    func tunnelAuthorize(_ key: PublicKey) -> Bool
    /// Server: the replay check for a handshake's timestamp; records it when accepted.
    func tunnelCheckReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict
    /// The handshake finished; streams may be opened (client) or will be requested (server).
    func tunnelEstablished(_ tunnel: TunnelConnectionHandler, session: EstablishedSession)
    /// Server: the client proved it holds the session keys (its first record authenticated).
    func tunnelConfirmed(_ tunnel: TunnelConnectionHandler)
    /// Server: the client asks for a stream to `stream.target`. Answer with `stream.completeOpen`.
    func tunnel(_ tunnel: TunnelConnectionHandler, openRequested stream: TunnelStream)
    /// Client: the server answered the OPEN of a stream to `target` (`answeredEarly`: opened with early data,
    /// and its application was told it succeeded before this answer).
    func tunnel(_ tunnel: TunnelConnectionHandler, opened target: TargetAddress, reply: ReplyCode, answeredEarly: Bool)
    /// The peer sent GOAWAY: no new streams on this connection.
    func tunnelPeerGoingAway(_ tunnel: TunnelConnectionHandler)
    /// A stream left the table (a slot for a new one may be free).
    func tunnelStreamReleased(_ tunnel: TunnelConnectionHandler)
    /// Full tunnel: one IP packet from the peer.
    func tunnel(_ tunnel: TunnelConnectionHandler, receivedIPPacket packet: ByteBuffer)
    /// The bytes of one socket read have been processed (a delegate may hold packets until then).
    func tunnelReadFinished(_ tunnel: TunnelConnectionHandler)
    /// A CONTROL frame from the peer; throwing ends the connection with that error.
    func tunnel(_ tunnel: TunnelConnectionHandler, receivedControl payload: ByteBuffer) throws(ProtocolError)
    /// Server: the handshake failed (the connection closes silently next). Return true when the delegate has
    /// logged it (it may throttle strangers' lines); false lets the connection log it.
    func tunnelHandshakeFailed(_ tunnel: TunnelConnectionHandler, error: ProtocolError) -> Bool
    /// The connection is over. `error` is nil after an authenticated CLOSE; otherwise it says why.
    func tunnelClosed(_ tunnel: TunnelConnectionHandler, error: ProtocolError?)
    /// The connection broke (`error` says how) and the session was kept for another one (docs/PROTOCOL.md §7):
    /// its streams wait. The handler has left the connection.
    func tunnelDetached(_ tunnel: TunnelConnectionHandler, error: ProtocolError)
    /// The session goes on over a new connection; `replayed` of its records went out again.
    func tunnelResumed(_ tunnel: TunnelConnectionHandler, replayed: Int)
    /// Server: the session a RESUME names, if the client holding `key` may resume it.
    func tunnelResumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate?
    /// Server: this connection's client proved it may resume `candidate`; hand `connection` (and this
    /// channel) to that session. This handler's own session is spent.
    func tunnel(
        _ tunnel: TunnelConnectionHandler,
        resumeAccepted candidate: ResumeCandidate,
        connection: TunnelSession.Connection,
        peerCount: UInt64
    )
}

extension TunnelConnectionDelegate {
    public func tunnelAuthorize(_ key: PublicKey) -> Bool { false }
    public func tunnelCheckReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict { .accept }
    public func tunnelConfirmed(_ tunnel: TunnelConnectionHandler) {}
    public func tunnelHandshakeFailed(_ tunnel: TunnelConnectionHandler, error: ProtocolError) -> Bool { false }
    public func tunnel(_ tunnel: TunnelConnectionHandler, openRequested stream: TunnelStream) {
        stream.completeOpen(reply: .commandNotSupported, bound: .unspecified)
    }
    public func tunnel(
        _ tunnel: TunnelConnectionHandler,
        opened target: TargetAddress,
        reply: ReplyCode,
        answeredEarly: Bool
    ) {}
    public func tunnelPeerGoingAway(_ tunnel: TunnelConnectionHandler) {}
    public func tunnelStreamReleased(_ tunnel: TunnelConnectionHandler) {}
    public func tunnel(_ tunnel: TunnelConnectionHandler, receivedIPPacket packet: ByteBuffer) {}
    public func tunnelReadFinished(_ tunnel: TunnelConnectionHandler) {}
    public func tunnel(_ tunnel: TunnelConnectionHandler, receivedControl payload: ByteBuffer) throws(ProtocolError) {}
    public func tunnelDetached(_ tunnel: TunnelConnectionHandler, error: ProtocolError) {}
    public func tunnelResumed(_ tunnel: TunnelConnectionHandler, replayed: Int) {}
    public func tunnelResumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate? { nil }
    public func tunnel(
        _ tunnel: TunnelConnectionHandler,
        resumeAccepted candidate: ResumeCandidate,
        connection: TunnelSession.Connection,
        peerCount: UInt64
    ) {}
}
