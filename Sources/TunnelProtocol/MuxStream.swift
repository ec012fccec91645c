import NIOCore
import TunnelCompression

/// The object that performs a stream's local I/O; the transport layer refines it.
public protocol MuxStreamContext: AnyObject {
    func deliver(_ data: ByteBuffer)
    func peerFinished()
    func streamClosed(reset: ErrorCode?)
    func readIfWanted()
    /// One DATAGRAM frame's payload (`atyp addr port data`) on a UDP association.
    func deliverDatagram(_ payload: ByteBuffer)
    /// End of a batch of deliveries (one flush per tunnel read), for a context that asked for it.
    func flushDelivered()
}

extension MuxStreamContext {
    public func deliverDatagram(_ payload: ByteBuffer) {}
    public func flushDelivered() {}
}

/// One multiplexed stream, as the multiplexer tracks it. The handler that owns the stream's local socket
/// keeps itself in `context`.
public final class MuxStream {
    /// Lifecycle on the wire, each half-closed state spelled out (RFC 9113 §5.1; as NIOSSH's
    /// `ChildChannelStateMachine`).
    public enum State: Hashable, Sendable {
        /// OPEN is on the wire (client) or being served (server); no data flows yet.
        case opening
        /// Data may flow both ways.
        case open
        /// Our FIN is on the wire; the peer may still send.
        case halfClosedLocal
        /// The peer's FIN arrived; we may still send.
        case halfClosedRemote
        /// Both FINs crossed (`reset` nil), or a RESET went either way (its code). Nothing more is sent or
        /// accepted; the stream stays known until its local socket has finished writing and the handler
        /// releases it.
        case closed(reset: ErrorCode?)

        /// Opened and not closed: data may flow in at least one direction.
        public var isOpen: Bool {
            switch self {
            case .open, .halfClosedLocal, .halfClosedRemote: true
            case .opening, .closed: false
            }
        }

        public var isClosed: Bool {
            if case .closed = self { true } else { false }
        }

        /// This side may still send (its FIN is not out).
        public var maySend: Bool { self == .open || self == .halfClosedRemote }
    }

    /// The stream's id.
    public let id: StreamID
    /// Where the stream goes (for logs).
    public let target: TargetAddress
    /// A TCP stream, or a UDP association.
    public let kind: StreamKind
    /// Lifecycle state.
    public internal(set) var state: State = .opening
    /// The peer's FIN arrived (the stream may be closed since; or, with early data, it is still opening).
    public var finReceived: Bool { self.state == .halfClosedRemote || self.earlyFinReceived }
    /// Our FIN is on the wire and the peer's has not come.
    public var finSent: Bool { self.state == .halfClosedLocal }
    /// The code of the RESET that ended the stream, if one did.
    public var resetCode: ErrorCode? {
        if case .closed(let reset) = self.state { reset } else { nil }
    }
    /// The local socket reached EOF: a FIN goes out after the pending bytes.
    public internal(set) var localEndOfStream = false
    /// Opened with early data (`Multiplexer.openStream(early:)`): open on this side, its OPEN_RESULT not yet
    /// here.
    public internal(set) var awaitingOpenResult = false
    /// Opened with early data, and the local side was told it succeeded before the OPEN_RESULT came (set by
    /// the runtime): the real result is then not reported to it again, and a failure ends the stream instead.
    public var answeredEarly = false
    /// Acceptor with early data: the opener's FIN came before this side answered the OPEN.
    var earlyFinReceived = false
    /// Acceptor with early data: bytes that came before this side answered the OPEN, handed on when it opens.
    var earlyReceived: [ByteBuffer] = []
    /// Whoever carries out this stream's I/O (the handler of its local socket). Typed by the transport layer.
    public var context: (any MuxStreamContext)? = nil

    /// Send credit granted by the peer for this stream.
    var sendCredit = SendCredit(0)
    /// Receive accounting for this stream.
    var receiveWindow: ReceiveWindow
    /// Received bytes whose connection credit goes back only when they are consumed: they arrived while the
    /// connection's readers held more than `maxBufferedBytes` (all other bytes return it on arrival).
    var connectionCreditOwed = 0
    /// Bytes read from the local socket and not yet framed.
    var pending = CircularBuffer<ByteBuffer>(initialCapacity: 2)
    var pendingBytes = 0
    /// The peer's window for this stream is spent while bytes wait: they wait for the peer's reader, not for
    /// the tunnel, and are left out of the connection-wide pending limit (a reader that stops reading at the
    /// far end must not stop the other streams from reading here).
    var creditStalled = false
    /// In the send queue (either the round-robin queue or the wait for connection credit).
    var scheduled = false
    /// Waiting in the queue of readers held back by a connection-wide limit.
    var readBlocked = false
    /// Already removed from the multiplexer.
    var released = false
    /// The local socket is gone but the FIN still has to go out; the stream leaves the table after it.
    var releaseWhenFinished = false
    /// Bytes the stream may still send as interactive (`StreamScheduler`); negative once spent past zero.
    var interactiveAllowance = 0
    /// When the allowance was last refilled.
    var allowanceUpdated = NIODeadline.uptimeNanoseconds(0)
    /// Queued (or last queued) in the bulk class.
    var bulkClass = false

    /// Sending-side compression of this stream (only when the session negotiated compression).
    enum Compression {
        /// No data sent yet: decided on the first bytes.
        case undecided
        /// Compressing with this context; `fresh` until its first frame went out.
        case active(Deflater, fresh: Bool, lastUse: NIODeadline)
        /// Was compressing, context freed after idling: the next frame starts a new one.
        case idle
        /// Not worth it (incompressible data, or not a TCP stream).
        case off
    }
    var compression = Compression.undecided
    /// Input and output bytes since the last compressibility check.
    var probeInput = 0
    var probeOutput = 0
    /// Receiving-side inflate context, created by a frame with `compressionStart`.
    var inflater: Inflater?
    var lastInflate = NIODeadline.distantPast

    /// Bytes received for this stream and not yet consumed by the local socket.
    public var bufferedBytes: Int { self.receiveWindow.buffered }
    /// Bytes of this stream sent and received so far (status `--streams`).
    public internal(set) var bytesSent = 0
    public internal(set) var bytesReceived = 0
    /// When the stream was opened (the multiplexer's clock).
    public internal(set) var openedAt = NIODeadline.uptimeNanoseconds(0)
    /// Bytes read locally and not yet sent.
    public var pendingSendBytes: Int { self.pendingBytes }
    /// Send credit left.
    public var availableSendCredit: Int { self.sendCredit.available }

    init(id: StreamID, target: TargetAddress, kind: StreamKind = .tcp, receiveWindow: ReceiveWindow) {
        self.id = id
        self.target = target
        self.kind = kind
        self.receiveWindow = receiveWindow
    }

    /// Whether the scheduler has something it may send now (ignoring connection credit).
    var hasSendableWork: Bool {
        guard self.state.maySend else { return false }
        if self.pendingBytes > 0 { return self.sendCredit.available > 0 }
        return self.localEndOfStream
    }
}
