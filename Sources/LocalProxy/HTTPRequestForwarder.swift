import NIOCore
import TunnelProtocol

/// The request side of the plain-HTTP forward proxy, as a value (RFC 9112): bytes from the application go
/// in, what to do comes out, one action at a time. Each request head in absolute form is decided
/// (`HTTPProxy.decide`: forward, tunnel or refuse) and re-encoded in origin form; its body passes through by
/// its framing; one keep-alive connection carries requests to different origins one after another (a new
/// upstream per origin), and the next request is looked at only once the response to the previous one is
/// complete. The response side is `HTTPResponseRelay`; `HTTPForwardHandler` drives both.
///
/// Pull-style (`next`): the caller acts on each action before the forwarder looks further (an upstream it is
/// told to open must be reported open with `upstreamOpened` before the request's bytes come out).
public struct HTTPRequestForwarder: Sendable {
    public enum State: Equatable, Sendable {
        /// Waiting for (the rest of) a request head.
        case head
        /// Waiting for the upstream to `target` to open (the head and body wait here).
        case opening(TargetAddress)
        /// Sending a request body upstream.
        case body(HTTPBodyFramer)
        /// The request is sent; the next one waits until the response is complete.
        case awaitingResponse
        /// A CONNECT is being set up; the connection becomes a tunnel once it opens.
        case connecting
        /// Nothing more to read (the connection is closing, or turned into a tunnel).
        case done
    }

    /// One thing to do.
    public enum Action: Equatable, Sendable {
        /// Send these bytes on the current upstream; `request` names the request when they begin one
        /// ("GET example.com:80/path", for the log).
        case send(ByteBuffer, request: String? = nil)
        /// Let go of the current upstream (if any) and open one to this origin; report the result with
        /// `upstreamOpened` or `upstreamFailed`. `request` names the request that waits for it.
        case open(TargetAddress, request: String)
        /// CONNECT: let go of the current upstream, open a tunnel to `target`, answer 200 and relay; `early`
        /// holds what the application sent after its CONNECT head.
        case connect(TargetAddress, early: ByteBuffer)
        /// Answer with this status and close.
        case refuse(status: Int, message: String, authenticate: Bool)
        /// The application finished (EOF after complete exchanges): close its connection.
        case close
    }

    public private(set) var state = State.head
    private let credentials: ProxyCredentials?
    /// The application's bytes not yet used.
    private var inbound: ByteBuffer
    /// The request head (origin form) waiting for its upstream to open.
    private var pendingHead: ByteBuffer?
    private var pendingBody = HTTPBodyFramer.Mode.none
    /// The origin of the upstream that may carry the next request (nil: none may).
    public private(set) var reusableUpstream: TargetAddress?
    /// The application asked to close after the current response.
    public private(set) var clientWantsClose = false
    /// The application closed its sending side.
    public private(set) var clientInputClosed = false
    /// The response side.
    public var response = HTTPResponseRelay()

    public init(credentials: ProxyCredentials?, initialBytes: ByteBuffer = ByteBuffer()) {
        self.credentials = credentials
        self.inbound = initialBytes
    }

    // MARK: - Events in

    /// Bytes from the application.
    public mutating func received(_ bytes: ByteBuffer) {
        var bytes = bytes
        self.inbound.writeBuffer(&bytes)
    }

    /// Whether to read the application's socket (for a body, also only while the upstream has credit: the
    /// caller checks that).
    public var wantsInput: Bool {
        switch self.state {
        case .head: self.inbound.readableBytes < HTTPHeadParser.defaultMaxSize
        case .body: true
        case .opening, .awaitingResponse, .connecting, .done: false
        }
    }

    /// What the application's EOF calls for.
    public enum EndOfInput: Equatable, Sendable {
        /// Nothing now: a CONNECT starts its tunnel with the FIN, or the connection is already ending.
        case wait
        /// Every exchange is complete: close the connection.
        case close
        /// A request or response was outstanding: the application left (HTTP/1.1 clients do not half-close
        /// to end a request, as Squid's default `half_closed_clients off` assumes); end everything it asked.
        case abort
    }

    /// The application closed its sending side.
    public mutating func applicationClosedInput() -> EndOfInput {
        self.clientInputClosed = true
        switch self.state {
        case .head where self.inbound.readableBytes == 0:
            return self.response.isIdle ? .close : .abort
        case .connecting, .done:
            return .wait
        case .head, .opening, .body, .awaitingResponse:
            return .abort
        }
    }

    /// The upstream asked for by `.open` is open: the waiting request goes out next.
    public mutating func upstreamOpened() {
        guard case .opening(let target) = self.state else { return }
        self.reusableUpstream = target
        self.state = .awaitingResponse
        if let head = self.pendingHead {
            self.pendingHead = nil
            self.queued = head
        }
        if self.pendingBody != .none { self.state = .body(HTTPBodyFramer(self.pendingBody)) }
    }

    /// The upstream may not carry another request (the origin ended it, or it failed).
    public mutating func upstreamUnusable() {
        self.reusableUpstream = nil
    }

    /// The response is complete. Returns true when the application's connection should close now.
    public mutating func responseFinished(closeAfter: Bool) -> Bool {
        if closeAfter || (self.clientInputClosed && self.inbound.readableBytes == 0) {
            self.state = .done
            return true
        }
        if self.state == .awaitingResponse { self.state = .head }
        return false
    }

    /// Nothing more is read (the connection closes, or became a tunnel).
    public mutating func finish() {
        self.state = .done
        self.reusableUpstream = nil
    }

    // MARK: - Actions out

    /// Bytes to send before anything else (a head whose upstream just opened).
    private var queued: ByteBuffer?

    /// The next thing to do, or nil to wait for more bytes or an event.
    public mutating func next() -> Action? {
        if let bytes = self.queued {
            self.queued = nil
            return .send(bytes)
        }
        switch self.state {
        case .head:
            guard self.response.isIdle else { return nil }
            return self.nextRequest()
        case .body(var framer):
            guard self.inbound.readableBytes > 0 else { return nil }
            let count: Int
            do {
                count = try framer.consume(self.inbound)
            } catch {
                return self.refuse(status: 400, message: error.description)
            }
            self.state = framer.isComplete ? .awaitingResponse : .body(framer)
            return count > 0 ? .send(self.inbound.readSlice(length: count)!) : nil
        case .opening, .awaitingResponse, .connecting, .done:
            return nil
        }
    }

    private mutating func nextRequest() -> Action? {
        let head: HTTPRequestHead
        do {
            guard let parsed = try HTTPHeadParser.parseRequest(&self.inbound) else {
                if self.clientInputClosed && self.inbound.readableBytes == 0 {
                    self.finish()
                    return .close
                }
                return nil
            }
            head = parsed
        } catch {
            return self.refuse(status: 400, message: error.description)
        }
        switch HTTPProxy.decide(head, credentials: self.credentials) {
        case .reject(let status, let message, let authenticate):
            return self.refuse(status: status, message: message, authenticate: authenticate)
        case .tunnel(let target):
            self.state = .connecting
            self.reusableUpstream = nil
            let early = self.inbound
            self.inbound = ByteBuffer()
            return .connect(target, early: early)
        case .forward(let target, let rewritten, let body, let closeAfter):
            self.clientWantsClose = closeAfter
            self.response.expectResponse(to: rewritten.method)
            let headBytes = rewritten.encoded()
            let request = "\(rewritten.method) \(target)\(rewritten.target)"
            if self.reusableUpstream == target {
                self.state = body == .none ? .awaitingResponse : .body(HTTPBodyFramer(body))
                return .send(headBytes, request: request)
            }
            // Another origin (or no upstream that may be reused): a new one; the old one ends.
            self.reusableUpstream = nil
            self.pendingHead = headBytes
            self.pendingBody = body
            self.state = .opening(target)
            return .open(target, request: request)
        }
    }

    /// The upstream could not be opened: nothing more is forwarded (the caller answers with an error status
    /// and closes).
    public mutating func upstreamFailed() {
        self.response = HTTPResponseRelay()
        self.finish()
        self.pendingHead = nil
    }

    private mutating func refuse(status: Int, message: String, authenticate: Bool = false) -> Action {
        self.finish()
        self.pendingHead = nil
        return .refuse(status: status, message: message, authenticate: authenticate)
    }
}
