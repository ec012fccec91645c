import NIOCore
import TunnelProtocol

/// Whoever carries out one stream's local I/O: a plain relay socket (`LocalStreamHandler`), or a protocol
/// front end that looks into the bytes (the HTTP forward proxy). The tunnel handler calls these on its event
/// loop as the multiplexer reports events for the stream (`deliver`, `peerFinished`, `streamClosed`,
/// `readIfWanted` come from `MuxStreamContext`).
public protocol StreamEndpoint: MuxStreamContext {
    /// Binds the endpoint to its stream once the stream exists (its one handle on it).
    func attach(_ stream: TunnelStream)
    /// Client: the OPEN_RESULT arrived.
    func openCompleted(reply: ReplyCode, bound: TargetAddress)
    /// The requester went away before the OPEN_RESULT: give the stream up if one was opened.
    func cancelPendingOpen()
    /// Whether this endpoint may be told "succeeded" before the OPEN_RESULT (fast open), a later failure then
    /// reaching it as the stream's reset. The relay of a CONNECT (SOCKS5, SOCKS4, HTTP CONNECT) may.
    var takesEarlyAnswer: Bool { get }
}

extension StreamEndpoint {
    public var takesEarlyAnswer: Bool { false }
}
