import NIOCore

/// The response side of the plain-HTTP forward proxy, as a value (RFC 9112 §6): bytes from the origin go in,
/// what to write to the application comes out, one piece at a time. Each response head (and any 1xx before
/// the final one) is parsed and re-encoded — a Content-Length beside a Transfer-Encoding is dropped (§6.3) —
/// and the body passes through as it arrives, by its framing, until the response is complete.
///
/// Pull-style (`next`), so the caller can act on a finished response (start the next request, which calls
/// `expectResponse`) before the relay looks at any byte after it.
public struct HTTPResponseRelay: Sendable {
    public enum State: Sendable {
        /// No request outstanding.
        case idle
        /// Reading the head of the response to a request with this method.
        case head(method: String)
        /// Relaying a body; the connection closes after it when `closeAfter`.
        case body(HTTPBodyFramer, closeAfter: Bool)
    }

    /// One piece of what to do.
    public enum Output: Equatable, Sendable {
        /// Write this re-encoded head to the application; it stood for `consumed` bytes from the origin.
        case head(ByteBuffer, consumed: Int)
        /// Write these body bytes to the application, as they came.
        case body(ByteBuffer)
        /// The response is complete; the application's connection closes after it when `closeAfter`.
        case finished(closeAfter: Bool)
    }

    public enum Failure: Error, Equatable, Sendable {
        /// The origin sent something that is not an HTTP response, or a body that breaks its framing.
        case invalid(String)
        /// Bytes after a complete response with no request outstanding.
        case bytesAfterResponse
        /// The origin closed in the middle of a response.
        case truncated
    }

    public private(set) var state = State.idle
    /// The part of a head received so far.
    private var headBytes = ByteBuffer()

    public init() {}

    public var isIdle: Bool {
        if case .idle = self.state { true } else { false }
    }

    /// A request to the origin went out: its response comes next.
    public mutating func expectResponse(to method: String) {
        self.state = .head(method: method)
        self.headBytes.clear()
    }

    /// Takes what it can of `data` and says what to do with it; nil when `data` is used up without anything
    /// to do yet (a head still incomplete). `clientWantsClose`: the application asked to close after this
    /// response.
    public mutating func next(_ data: inout ByteBuffer, clientWantsClose: Bool) throws(Failure) -> Output? {
        switch self.state {
        case .idle:
            guard data.readableBytes == 0 else { throw Failure.bytesAfterResponse }
            return nil
        case .head(let method):
            guard data.readableBytes > 0 else { return nil }
            self.headBytes.writeBuffer(&data)
            let collected = self.headBytes.readableBytes
            var head: HTTPResponseHead
            do {
                guard let parsed = try HTTPHeadParser.parseResponse(&self.headBytes) else { return nil }
                head = parsed
            } catch {
                throw Failure.invalid("\(error)")
            }
            // The transfer coding frames the body: the application must not be handed a Content-Length that
            // says otherwise.
            if !head.headers.tokens("Transfer-Encoding").isEmpty { head.headers.remove("Content-Length") }
            let consumed = collected - self.headBytes.readableBytes
            // What followed the head is the caller's again.
            data = self.headBytes
            self.headBytes = ByteBuffer()
            if head.status < 200 && head.status != 101 {
                // An interim response (100 Continue): the final one follows.
                return .head(head.encoded(), consumed: consumed)
            }
            let mode: HTTPBodyFramer.Mode
            do {
                mode = try HTTPBodyFramer.forResponse(head, requestMethod: method)
            } catch {
                throw Failure.invalid("\(error)")
            }
            let tokens = Set(head.headers.tokens("Connection"))
            let closeAfter =
                head.status == 101 || mode == .untilClose || tokens.contains("close")
                || (head.version == "HTTP/1.0" && !tokens.contains("keep-alive")) || clientWantsClose
            self.state = .body(HTTPBodyFramer(mode), closeAfter: closeAfter)
            return .head(head.encoded(), consumed: consumed)
        case .body(var framer, let closeAfter):
            if framer.isComplete {
                self.state = .idle
                return .finished(closeAfter: closeAfter)
            }
            guard data.readableBytes > 0 else { return nil }
            let count: Int
            do {
                count = try framer.consume(data)
            } catch {
                throw Failure.invalid("\(error)")
            }
            self.state = .body(framer, closeAfter: closeAfter)
            return .body(data.readSlice(length: count)!)
        }
    }

    /// The origin closed its side: a body delimited by the close is complete (and so is the application's
    /// connection); nothing is lost between responses; anything else was cut short.
    public mutating func originClosed() throws(Failure) -> Output? {
        switch self.state {
        case .idle:
            return nil
        case .body(let framer, _) where framer.mode == .untilClose:
            self.state = .idle
            return .finished(closeAfter: true)
        case .head, .body:
            throw Failure.truncated
        }
    }
}
