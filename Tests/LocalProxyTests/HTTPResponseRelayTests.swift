import LocalProxy
import NIOCore
import Testing

/// The response side of the HTTP forwarder without sockets: origin bytes in, pieces to write out.
struct HTTPResponseRelayTests {
    /// Feeds `chunks` (as the stream delivers them) and collects what the relay says, as text.
    func relay(
        _ chunks: [String],
        method: String = "GET",
        clientWantsClose: Bool = false,
        relay: inout HTTPResponseRelay
    )
        throws(HTTPResponseRelay.Failure) -> [String]
    {
        var out: [String] = []
        for chunk in chunks {
            var data = ByteBuffer(string: chunk)
            while let output = try relay.next(&data, clientWantsClose: clientWantsClose) {
                switch output {
                case .head(let head, let consumed): out.append("head(\(consumed)):" + String(buffer: head))
                case .body(let bytes): out.append("body:" + String(buffer: bytes))
                case .finished(let closeAfter): out.append("finished(close: \(closeAfter))")
                }
            }
        }
        return out
    }

    @Test func aLengthFramedResponseInPiecesThenTheNextOnTheSameConnection() throws {
        var relay = HTTPResponseRelay()
        relay.expectResponse(to: "GET")
        let out = try self.relay(["HTTP/1.1 200 OK\r\nContent-Le", "ngth: 5\r\n\r\nhel", "lo"], relay: &relay)
        #expect(
            out == [
                "head(38):HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "body:hel", "body:lo",
                "finished(close: false)",
            ]
        )
        #expect(relay.isIdle)
        relay.expectResponse(to: "HEAD")
        let head = try self.relay(["HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"], relay: &relay)
        #expect(head.last == "finished(close: false)" && head.count == 2, "a HEAD response has no body")
    }

    @Test func bothTransferEncodingAndContentLengthLoseTheLength() throws {
        var relay = HTTPResponseRelay()
        relay.expectResponse(to: "GET")
        let out = try self.relay(
            ["HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
            relay: &relay
        )
        #expect(out.first?.contains("Content-Length") == false)
        #expect(out.first?.contains("Transfer-Encoding: chunked") == true)
        #expect(out.dropFirst().joined() == "body:5\r\nhello\r\n0\r\n\r\nfinished(close: false)")
    }

    @Test func interimResponsesComeBeforeTheFinalOne() throws {
        var relay = HTTPResponseRelay()
        relay.expectResponse(to: "POST")
        let out = try self.relay(["HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"], relay: &relay)
        #expect(
            out.count == 3 && out[0].contains("100 Continue") && out[1].contains("204")
                && out[2] == "finished(close: false)"
        )
    }

    @Test func whatClosesTheConnectionAfterwards() throws {
        for (response, wants) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", false),
            ("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true),
        ] {
            var relay = HTTPResponseRelay()
            relay.expectResponse(to: "GET")
            let out = try self.relay([response], clientWantsClose: wants, relay: &relay)
            #expect(out.last == "finished(close: true)", "\(response)")
        }
        // A body delimited by the close ends when the origin closes.
        var relay = HTTPResponseRelay()
        relay.expectResponse(to: "GET")
        let out = try self.relay(["HTTP/1.1 200 OK\r\n\r\npart"], relay: &relay)
        #expect(out.last == "body:part")
        let closed = try relay.originClosed()
        #expect(closed == .finished(closeAfter: true))
    }

    @Test func brokenOriginsAreFailures() {
        var extra = HTTPResponseRelay()
        extra.expectResponse(to: "GET")
        #expect(throws: HTTPResponseRelay.Failure.bytesAfterResponse) {
            _ = try self.relay(["HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab"], relay: &extra)
        }
        var garbage = HTTPResponseRelay()
        garbage.expectResponse(to: "GET")
        #expect(throws: HTTPResponseRelay.Failure.self) {
            _ = try self.relay(["SSH-2.0-OpenSSH\r\n\r\n"], relay: &garbage)
        }
        var cut = HTTPResponseRelay()
        cut.expectResponse(to: "GET")
        _ = try? self.relay(["HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], relay: &cut)
        #expect(throws: HTTPResponseRelay.Failure.truncated) { _ = try cut.originClosed() }
        var idle = HTTPResponseRelay()
        let nothing = try? idle.originClosed()
        #expect(nothing == .some(nil), "between responses the origin may close")
    }
}
