import LocalProxy
import NIOCore
import Testing
import TunnelProtocol

/// The request side of the HTTP forwarder without sockets: application bytes and events in, actions out.
struct HTTPRequestForwarderTests {
    let example = TargetAddress(host: .domain("example.com"), port: 80)
    let other = TargetAddress(host: .domain("other.test"), port: 8080)

    /// Every action until the forwarder waits, with `.send` bytes as text.
    func drain(_ forwarder: inout HTTPRequestForwarder) -> [String] {
        var out: [String] = []
        while let action = forwarder.next() {
            switch action {
            case .send(let bytes, _): out.append("send:" + String(buffer: bytes))
            case .open(let target, let request): out.append("open:\(target) \(request.prefix { $0 != " " })")
            case .connect(let target, let early): out.append("connect:\(target) early:" + String(buffer: early))
            case .refuse(let status, _, let authenticate): out.append("refuse:\(status) auth:\(authenticate)")
            case .close: out.append("close")
            }
        }
        return out
    }

    /// The origin answers the outstanding request (an empty 200) through the response side; returns whether
    /// the application's connection closes after it.
    func respond(_ forwarder: inout HTTPRequestForwarder, closeAfter: Bool = false) -> Bool {
        var data = ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        while let output = try? forwarder.response.next(&data, clientWantsClose: forwarder.clientWantsClose) {
            if case .finished(let close) = output { return forwarder.responseFinished(closeAfter: close || closeAfter) }
        }
        Issue.record("the response did not finish")
        return true
    }

    @Test func requestsReuseTheUpstreamOfTheSameOriginAndOpenAnotherForAnother() {
        var forwarder = HTTPRequestForwarder(credentials: nil)
        forwarder.received(
            ByteBuffer(
                string: "GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\nProxy-Connection: keep-alive\r\n\r\n"
            )
        )
        #expect(forwarder.next() == .open(self.example, request: "GET example.com:80/a"))
        #expect(!forwarder.wantsInput, "nothing is read while the upstream opens")
        forwarder.upstreamOpened()
        #expect(self.drain(&forwarder) == ["send:GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n"])
        #expect(forwarder.state == .awaitingResponse)

        // A pipelined request waits until the response to the first is complete.
        forwarder.received(ByteBuffer(string: "GET http://example.com/b HTTP/1.1\r\nHost: example.com\r\n\r\n"))
        #expect(self.drain(&forwarder) == [])
        #expect(!self.respond(&forwarder))
        #expect(self.drain(&forwarder) == ["send:GET /b HTTP/1.1\r\nHost: example.com\r\n\r\n"])
        #expect(!self.respond(&forwarder))

        // Another origin: a new upstream.
        forwarder.received(ByteBuffer(string: "GET http://other.test:8080/ HTTP/1.1\r\nHost: other.test:8080\r\n\r\n"))
        #expect(self.drain(&forwarder) == ["open:\(self.other) GET"])
        forwarder.upstreamOpened()
        #expect(self.drain(&forwarder).count == 1)

        // The origin ended the keep-alive upstream: the next request to it opens a new one.
        #expect(!self.respond(&forwarder))
        forwarder.upstreamUnusable()
        forwarder.received(ByteBuffer(string: "HEAD http://other.test:8080/ HTTP/1.1\r\nHost: other.test:8080\r\n\r\n"))
        #expect(self.drain(&forwarder) == ["open:\(self.other) HEAD"])
    }

    @Test(arguments: [1, 3, 1000])
    func aBodyGoesUpstreamByItsFramingWhateverTheReadsAndTheNextRequestWaits(pieceSize: Int) {
        let request =
            "POST http://example.com/up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world"
            + "GET http://example.com/next HTTP/1.1\r\nHost: example.com\r\n\r\n"
        var forwarder = HTTPRequestForwarder(credentials: nil)
        var actions: [String] = []
        var rest = Substring(request)
        var opened = false
        while !rest.isEmpty {
            forwarder.received(ByteBuffer(string: String(rest.prefix(pieceSize))))
            rest = rest.dropFirst(pieceSize)
            actions += self.drain(&forwarder)
            if !opened, actions.first?.hasPrefix("open:") == true {
                opened = true
                forwarder.upstreamOpened()
                actions += self.drain(&forwarder)
            }
        }
        let sent = actions.filter { $0.hasPrefix("send:") }.map { $0.dropFirst(5) }.joined()
        #expect(sent == "POST /up HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world")
        #expect(forwarder.state == .awaitingResponse)
        #expect(!self.respond(&forwarder))
        #expect(self.drain(&forwarder) == ["send:GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n"])
    }

    /// RFC 9112 §6.3: with both Transfer-Encoding and Content-Length, the chunked framing wins and the
    /// Content-Length is not forwarded (a smuggling vector when two parsers disagree).
    @Test func aChunkedBodyIsFramedByItsChunksAndAContentLengthBesideItIsDropped() {
        var forwarder = HTTPRequestForwarder(credentials: nil)
        forwarder.received(
            ByteBuffer(
                string:
                    "POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                    + "4\r\nWiki\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
            )
        )
        #expect(self.drain(&forwarder) == ["open:\(self.example) POST"])
        forwarder.upstreamOpened()
        let actions = self.drain(&forwarder)
        let sent = actions.map { $0.dropFirst(5) }.joined()
        #expect(!sent.lowercased().contains("content-length"))
        #expect(sent.hasSuffix("4\r\nWiki\r\n0\r\n\r\n"), "the body ends with its last chunk")
        #expect(!sent.contains("smuggled"))
        // After the response, the bytes after the body are the next request: in origin form, it is refused.
        #expect(!self.respond(&forwarder))
        #expect(self.drain(&forwarder) == ["refuse:400 auth:false"])
        #expect(forwarder.state == .done)
    }

    @Test func connectAfterPlainRequestsTurnsTheConnectionIntoATunnel() {
        var forwarder = HTTPRequestForwarder(credentials: nil)
        forwarder.received(ByteBuffer(string: "CONNECT other.test:8080 HTTP/1.1\r\nHost: other.test:8080\r\n\r\nearly"))
        #expect(self.drain(&forwarder) == ["connect:\(self.other) early:early"])
        #expect(forwarder.state == .connecting && !forwarder.wantsInput)
        do {
            let result = forwarder.applicationClosedInput()
            #expect(result == .wait, "the tunnel starts with the FIN")
        }
    }

    @Test func badRequestsAndMissingCredentialsAreRefused() {
        var garbage = HTTPRequestForwarder(credentials: nil)
        garbage.received(ByteBuffer(string: "NOT HTTP\r\n\r\n"))
        #expect(self.drain(&garbage) == ["refuse:400 auth:false"])
        #expect(self.drain(&garbage) == [], "nothing after a refusal")

        let credentials = ProxyCredentials(username: "u", password: "p")
        var locked = HTTPRequestForwarder(credentials: credentials)
        locked.received(ByteBuffer(string: "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"))
        #expect(self.drain(&locked) == ["refuse:407 auth:true"])

        var unlocked = HTTPRequestForwarder(credentials: credentials)
        unlocked.received(
            ByteBuffer(
                string:
                    "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nProxy-Authorization: Basic dTpw\r\n\r\n"
            )
        )
        #expect(self.drain(&unlocked) == ["open:\(self.example) GET"])
        // The upstream could not be opened: the application gets the status for the reply code.
        unlocked.upstreamFailed()
        #expect(HTTPProxy.status(for: .connectionRefused).0 == 502)
        #expect(unlocked.state == .done)
        #expect(self.drain(&unlocked) == [], "nothing is forwarded after the failure")
    }

    @Test func theApplicationsEndOfInputClosesWhenIdleAndAbortsAnOutstandingExchange() {
        var idle = HTTPRequestForwarder(credentials: nil)
        do {
            let result = idle.applicationClosedInput()
            #expect(result == .close)
        }

        var midHead = HTTPRequestForwarder(credentials: nil)
        midHead.received(ByteBuffer(string: "GET http://example.com/ HTTP/1.1\r\n"))
        #expect(self.drain(&midHead) == [])
        do {
            let result = midHead.applicationClosedInput()
            #expect(result == .abort)
        }

        var waiting = HTTPRequestForwarder(credentials: nil)
        waiting.received(ByteBuffer(string: "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"))
        _ = self.drain(&waiting)
        waiting.upstreamOpened()
        _ = self.drain(&waiting)
        do {
            let result = waiting.applicationClosedInput()
            #expect(result == .abort, "a response is outstanding")
        }

        // A request sent in full before the EOF is answered, then the connection closes.
        var lastOne = HTTPRequestForwarder(credentials: nil)
        lastOne.received(
            ByteBuffer(string: "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        )
        _ = self.drain(&lastOne)
        lastOne.upstreamOpened()
        _ = self.drain(&lastOne)
        #expect(lastOne.clientWantsClose)
        #expect(self.respond(&lastOne), "Connection: close ends the connection after the response")
        #expect(lastOne.state == .done)
    }
}
