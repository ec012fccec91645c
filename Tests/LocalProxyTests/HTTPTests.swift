import Foundation
import NIOCore
import Testing
import TunnelProtocol

@testable import LocalProxy

struct HTTPHeadParserTests {
    @Test func parsesARequestHeadAndLeavesTheBody() throws {
        var buffer = ByteBuffer(
            string: "GET http://example.com/a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Multi:  a , b \r\n\r\nBODY"
        )
        let head = try #require(try HTTPHeadParser.parseRequest(&buffer))
        #expect(head.method == "GET" && head.target == "http://example.com/a?b=1" && head.version == "HTTP/1.1")
        #expect(head.headers.values("host") == ["example.com"])
        #expect(head.headers.tokens("x-multi") == ["a", "b"])
        #expect(String(buffer: buffer) == "BODY")
    }

    @Test func parsesCurlsProxyRequest() throws {
        var buffer = ByteBuffer(
            string:
                "GET http://localhost:35903/plain?q=1 HTTP/1.1\r\nHost: localhost:35903\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nProxy-Connection: Keep-Alive\r\n\r\n"
        )
        let head = try #require(try HTTPHeadParser.parseRequest(&buffer))
        #expect(head.target == "http://localhost:35903/plain?q=1")
    }

    @Test func waitsForTheBlankLineAtEveryCut() throws {
        let text = "POST http://h/ HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
        for cut in 0..<text.utf8.count {
            var buffer = ByteBuffer(bytes: Array(text.utf8.prefix(cut)))
            #expect(try HTTPHeadParser.parseRequest(&buffer) == nil)
            #expect(buffer.readerIndex == 0)
        }
    }

    @Test func bareLineFeedsAreAccepted() throws {
        var buffer = ByteBuffer(string: "GET http://h/ HTTP/1.0\nHost: h\n\n")
        #expect(try HTTPHeadParser.parseRequest(&buffer)?.headers.values("Host") == ["h"])
    }

    @Test(arguments: [
        "GET / HTTP/2.0\r\n\r\n", "GET  / HTTP/1.1\r\n\r\n", "GET /\r\n\r\n", "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "G(T / HTTP/1.1\r\n\r\n",
    ])
    func malformedHeadsThrow(text: String) {
        var buffer = ByteBuffer(string: text)
        #expect(throws: HTTPParseError.self) { _ = try HTTPHeadParser.parseRequest(&buffer) }
    }

    @Test func oversizedHeadsThrow() {
        var buffer = ByteBuffer(string: "GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 70_000))
        #expect(throws: HTTPParseError.self) { _ = try HTTPHeadParser.parseRequest(&buffer) }
    }

    @Test func parsesAResponseHead() throws {
        var buffer = ByteBuffer(string: "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        let head = try #require(try HTTPHeadParser.parseResponse(&buffer))
        #expect(head.status == 404 && head.reason == "Not Found")
        var noReason = ByteBuffer(string: "HTTP/1.1 200\r\n\r\n")
        #expect(try HTTPHeadParser.parseResponse(&noReason)?.status == 200)
        var bad = ByteBuffer(string: "HTTP/1.1 abc OK\r\n\r\n")
        #expect(throws: HTTPParseError.self) { _ = try HTTPHeadParser.parseResponse(&bad) }
    }
}

struct HTTPBodyFramerTests {
    func feed(_ framer: inout HTTPBodyFramer, _ text: String, pieces: Int) throws -> Int {
        let bytes = Array(text.utf8)
        var consumed = 0
        var index = 0
        while index < bytes.count && !framer.isComplete {
            let end = min(bytes.count, index + pieces)
            let n = try framer.consume(ByteBuffer(bytes: bytes[index..<end]))
            consumed += n
            if n < end - index { break }
            index = end
        }
        return consumed
    }

    @Test(arguments: [1, 2, 5, 1000])
    func chunkedBodyEndsAtTheLastChunkAndTrailers(pieces: Int) throws {
        let body = "4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n"
        var framer = HTTPBodyFramer(.chunked)
        let consumed = try self.feed(&framer, body + "GET next", pieces: pieces)
        #expect(framer.isComplete)
        #expect(consumed == body.utf8.count)
    }

    @Test func lengthBodyStopsAtItsLength() throws {
        var framer = HTTPBodyFramer(.length(5))
        #expect(try framer.consume(ByteBuffer(string: "abc")) == 3)
        #expect(try framer.consume(ByteBuffer(string: "defgh")) == 2)
        #expect(framer.isComplete)
    }

    @Test(arguments: ["x\r\n", "4\r\nWikiXX", "\r\n"])
    func malformedChunkingThrows(text: String) {
        var framer = HTTPBodyFramer(.chunked)
        #expect(throws: HTTPParseError.self) { _ = try framer.consume(ByteBuffer(string: text)) }
    }

    @Test func responseFramingRules() throws {
        func head(_ status: Int, _ fields: [(String, String)], version: String = "HTTP/1.1") -> HTTPResponseHead {
            HTTPResponseHead(
                version: version,
                status: status,
                reason: "",
                headers: HTTPHeaders(fields.map { ($0.0, $0.1) })
            )
        }
        #expect(
            try HTTPBodyFramer.forResponse(head(200, [("Content-Length", "10")]), requestMethod: "GET") == .length(10)
        )
        #expect(try HTTPBodyFramer.forResponse(head(200, [("Content-Length", "10")]), requestMethod: "HEAD") == .none)
        #expect(try HTTPBodyFramer.forResponse(head(204, []), requestMethod: "GET") == .none)
        #expect(try HTTPBodyFramer.forResponse(head(304, []), requestMethod: "GET") == .none)
        #expect(
            try HTTPBodyFramer.forResponse(head(200, [("Transfer-Encoding", "gzip, chunked")]), requestMethod: "GET")
                == .chunked
        )
        #expect(try HTTPBodyFramer.forResponse(head(200, []), requestMethod: "GET") == .untilClose)
        #expect(throws: HTTPParseError.self) {
            _ = try HTTPBodyFramer.forResponse(
                head(200, [("Content-Length", "1"), ("Content-Length", "2")]),
                requestMethod: "GET"
            )
        }
    }
}

struct HTTPProxyDecisionTests {
    func head(
        _ method: String,
        _ target: String,
        _ fields: [(String, String)] = [],
        version: String = "HTTP/1.1"
    ) -> HTTPRequestHead {
        HTTPRequestHead(
            method: method,
            target: target,
            version: version,
            headers: HTTPHeaders(fields.map { ($0.0, $0.1) })
        )
    }

    @Test func connectTargets() {
        #expect(
            HTTPProxy.decide(self.head("CONNECT", "example.com:443"), credentials: nil)
                == .tunnel(TargetAddress(host: .domain("example.com"), port: 443))
        )
        #expect(
            HTTPProxy.decide(self.head("CONNECT", "[::1]:8443"), credentials: nil)
                == .tunnel(TargetAddress(host: .ipv6(Array(repeating: 0, count: 15) + [1]), port: 8443))
        )
        #expect(
            HTTPProxy.decide(self.head("CONNECT", "10.0.0.1:22"), credentials: nil)
                == .tunnel(TargetAddress(host: .ipv4(0x0A00_0001), port: 22))
        )
        guard case .reject(400, _, _) = HTTPProxy.decide(self.head("CONNECT", "example.com"), credentials: nil) else {
            Issue.record()
            return
        }
    }

    @Test func absoluteFormIsRewrittenToOriginForm() {
        let decision = HTTPProxy.decide(
            self.head(
                "GET",
                "http://example.com:8080/path?q=1#frag",
                [
                    ("Host", "example.com:8080"), ("Proxy-Connection", "keep-alive"),
                    ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
                    ("Keep-Alive", "300"), ("Proxy-Authorization", "Basic abc"), ("Accept", "*/*"),
                ]
            ),
            credentials: nil
        )
        guard case .forward(let target, let rewritten, let body, let closeAfter) = decision else {
            Issue.record("\(decision)")
            return
        }
        #expect(target == TargetAddress(host: .domain("example.com"), port: 8080))
        #expect(rewritten.target == "/path?q=1")
        #expect(rewritten.headers.fields.map(\.name) == ["Host", "Accept"])
        #expect(body == .none && !closeAfter)
    }

    /// RFC 9112 §6.3: with both, Transfer-Encoding frames the body and Content-Length must not be passed on
    /// (a server that read it instead would take the rest of the body as a second, smuggled request).
    @Test func transferEncodingWinsAndContentLengthIsNotForwarded() {
        let decision = HTTPProxy.decide(
            self.head(
                "POST",
                "http://h/upload",
                [
                    ("Host", "h"), ("Content-Length", "5"), ("Transfer-Encoding", "chunked"),
                    ("Content-Type", "text/plain"),
                ]
            ),
            credentials: nil
        )
        guard case .forward(_, let rewritten, let body, _) = decision else {
            Issue.record("\(decision)")
            return
        }
        #expect(body == .chunked)
        #expect(rewritten.headers.values("Content-Length").isEmpty)
        #expect(rewritten.headers.values("Transfer-Encoding") == ["chunked"])
        #expect(rewritten.headers.fields.map(\.name) == ["Host", "Transfer-Encoding", "Content-Type"])
    }

    @Test func missingHostIsAddedAndDefaultPortIs80() {
        guard
            case .forward(let target, let rewritten, _, _) = HTTPProxy.decide(
                self.head("GET", "http://h"),
                credentials: nil
            )
        else {
            Issue.record()
            return
        }
        #expect(target.port == 80 && rewritten.target == "/" && rewritten.headers.values("Host") == ["h"])
    }

    @Test func http10WithoutKeepAliveClosesAfter() {
        guard
            case .forward(_, let rewritten, _, let closeAfter) = HTTPProxy.decide(
                self.head("GET", "http://h/", version: "HTTP/1.0"),
                credentials: nil
            )
        else {
            Issue.record()
            return
        }
        #expect(closeAfter && rewritten.headers.values("Connection") == ["close"])
    }

    @Test(arguments: ["/relative", "https://h/", "ftp://h/", "http://user@h/", "http://h:0/", "http://:80/"])
    func unusableTargetsAre400(target: String) {
        guard case .reject(400, _, _) = HTTPProxy.decide(self.head("GET", target), credentials: nil) else {
            Issue.record("\(target) was not refused")
            return
        }
    }

    @Test func basicAuthentication() {
        let credentials = ProxyCredentials(username: "alice", password: "p:ss")
        let good = "Basic " + "YWxpY2U6cDpzcw=="  // alice:p:ss
        guard
            case .tunnel = HTTPProxy.decide(
                self.head("CONNECT", "h:1", [("Proxy-Authorization", good)]),
                credentials: credentials
            )
        else {
            Issue.record()
            return
        }
        guard case .reject(407, _, true) = HTTPProxy.decide(self.head("CONNECT", "h:1"), credentials: credentials)
        else {
            Issue.record()
            return
        }
        guard
            case .reject(407, _, true) = HTTPProxy.decide(
                self.head("CONNECT", "h:1", [("Proxy-Authorization", "Basic YWxpY2U6d3Jvbmc=")]),
                credentials: credentials
            )
        else {
            Issue.record()
            return
        }
    }

    @Test func errorResponsesAreCompleteMessages() {
        let response = String(buffer: HTTPProxy.errorResponse(status: 502, message: "connection refused"))
        #expect(response.hasPrefix("HTTP/1.1 502 Bad Gateway\r\n"))
        #expect(response.contains("Connection: close\r\n"))
        let body = String(response[response.range(of: "\r\n\r\n")!.upperBound...])
        #expect(response.contains("Content-Length: \(body.utf8.count)\r\n"))
        #expect(HTTPProxy.status(for: .ttlExpired).0 == 504)
        #expect(HTTPProxy.status(for: .connectionRefused).0 == 502)
    }
}
