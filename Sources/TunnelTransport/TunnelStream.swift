import Logging
import NIOCore
import TunnelProtocol

/// One stream as the code at its local end sees it: the only way an endpoint (a relay socket, the HTTP
/// forwarder, a UDP association) or the server's connector acts on its stream. It carries the stream and a
/// weak reference to the tunnel connection that runs it; every call does nothing once that connection is
/// gone, so an endpoint never needs to know the multiplexer or the connection handler.
///
/// A class, made once per stream: endpoints and closures pass it around, and a struct holding a weak
/// reference pays a weak-reference copy and destroy (atomic, through the side table) for every pass.
public final class TunnelStream {
    /// The multiplexer's record of the stream (state, counters).
    public let muxStream: MuxStream
    private weak var tunnel: TunnelConnectionHandler?

    init(_ stream: MuxStream, tunnel: TunnelConnectionHandler) {
        self.muxStream = stream
        self.tunnel = tunnel
    }

    public var id: StreamID { self.muxStream.id }
    public var target: TargetAddress { self.muxStream.target }
    public var kind: StreamKind { self.muxStream.kind }
    /// Whether the stream has ended (FIN both ways, or RESET); `resetCode` tells which.
    public var isClosed: Bool { self.muxStream.state.isClosed }
    public var resetCode: ErrorCode? { self.muxStream.resetCode }
    /// Server: the OPEN is not answered yet (the client did not give up meanwhile).
    public var isOpening: Bool { self.muxStream.state == .opening }
    /// Whether the tunnel carrying it is still up.
    public var tunnelIsUp: Bool { self.tunnel?.isEstablished ?? false }
    /// The tunnel's logger (for a line about this stream).
    public var logger: Logger? { self.tunnel?.logger }

    private var multiplexer: Multiplexer? { self.tunnel?.multiplexer }

    /// Bytes the local socket read, to send to the peer (within the stream's credit: see `wantsInput`).
    public func send(_ data: ByteBuffer) {
        self.multiplexer?.localRead(data, on: self.muxStream)
    }

    /// The local socket reached EOF: FIN after the bytes before it.
    public func finish() {
        self.multiplexer?.localEndOfStream(on: self.muxStream)
    }

    /// Client: sends the OPENs queued on this stream's tunnel and answers its fast-opened streams now
    /// (`TunnelConnectionHandler.sendOpensNow`).
    public func sendOpensNow() { self.tunnel?.sendOpensNow() }

    /// Ends the stream abruptly both ways.
    public func reset(code: ErrorCode) {
        self.multiplexer?.resetStream(self.muxStream, code: code)
    }

    /// The local socket took `count` delivered bytes: their credit goes back to the peer.
    public func consumed(_ count: Int) {
        self.multiplexer?.consumed(count, on: self.muxStream, now: .now())
    }

    /// Whether the multiplexer wants more bytes from the local socket now (credit and queue room).
    public var wantsInput: Bool { self.multiplexer?.shouldRead(self.muxStream) ?? false }

    /// UDP: whether the association's socket should read more datagrams now. When not, `readIfWanted` comes
    /// once the tunnel's datagram queue has room again (the kernel drops what the socket cannot hold meanwhile).
    public var wantsDatagrams: Bool { self.multiplexer?.shouldReadDatagrams(for: self.muxStream) ?? true }

    /// Sends one datagram on a UDP stream; false when it was dropped (queue full).
    public func sendDatagram(_ payload: ByteBuffer) -> Bool {
        self.multiplexer?.sendDatagram(payload, on: self.muxStream) ?? false
    }

    /// The local end is gone: the stream leaves the table (reset first if it was still open).
    public func release() {
        self.tunnel?.release(self.muxStream)
    }

    /// Server: answers the OPEN once the outbound connection succeeded or failed.
    public func completeOpen(reply: ReplyCode, bound: TargetAddress) {
        self.tunnel?.multiplexer?.completeOpen(self.muxStream, reply: reply, bound: bound)
    }

    /// Server: `endpoint` carries out this stream's local I/O from now on.
    public func attach(_ endpoint: any StreamEndpoint) {
        endpoint.attach(self)
        self.muxStream.context = endpoint
    }

    /// Server: `context` gets this stream's events (a UDP association, which has no socket of its own).
    public func deliverEvents(to context: any MuxStreamContext) {
        self.muxStream.context = context
    }

    /// The event loop of the tunnel connection (nil once it is gone).
    public var eventLoop: (any EventLoop)? { self.tunnel?.eventLoop }

    /// `endpoint` wrote delivered bytes or datagrams: the tunnel calls its `flushDelivered` when the current
    /// read is done.
    public func needsFlush(_ endpoint: any MuxStreamContext) {
        self.tunnel?.markNeedsFlush(endpoint)
    }
}
