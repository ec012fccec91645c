import NIOCore

/// Finds where an HTTP/1.1 message body ends (RFC 9112 §6, §7.1) without changing it: the proxy forwards bodies
/// byte for byte and only needs to know the boundary, to keep a connection alive for the next message.
///
/// Only chunk-size lines and trailers are looked at byte by byte; chunk data is skipped in one step.
public struct HTTPBodyFramer: Equatable, Sendable {
    public enum Mode: Equatable, Sendable {
        /// No body.
        case none
        /// Exactly this many bytes.
        case length(Int)
        /// `Transfer-Encoding: chunked`.
        case chunked
        /// Until the connection closes (a response without length).
        case untilClose
    }

    private enum ChunkState: Equatable, Sendable {
        /// Reading hex digits of the chunk size.
        case size(Int, digits: Int)
        /// Skipping chunk extensions up to the line end.
        case sizeExtension(Int)
        /// Inside chunk data, this many bytes left.
        case data(Int)
        /// After chunk data: expecting CR LF.
        case dataEnd(sawCR: Bool)
        /// After the last chunk: at the start of a trailer line (an empty line ends the message).
        case trailerLineStart
        /// Inside a trailer line.
        case trailerLine
    }

    public let mode: Mode
    private var remaining: Int
    private var chunk: ChunkState = .size(0, digits: 0)
    /// Whether the body has ended.
    public private(set) var isComplete: Bool

    public init(_ mode: Mode) {
        self.mode = mode
        switch mode {
        case .none:
            self.remaining = 0
            self.isComplete = true
        case .length(let n):
            self.remaining = n
            self.isComplete = n == 0
        case .chunked, .untilClose:
            self.remaining = 0
            self.isComplete = false
        }
    }

    /// Feeds the bytes that follow; returns how many of them belong to this body (the rest start the next
    /// message). Throws on malformed chunked framing.
    public mutating func consume(_ buffer: ByteBuffer) throws(HTTPParseError) -> Int {
        guard !self.isComplete else { return 0 }
        switch self.mode {
        case .none:
            return 0
        case .untilClose:
            return buffer.readableBytes
        case .length:
            let n = min(self.remaining, buffer.readableBytes)
            self.remaining -= n
            if self.remaining == 0 { self.isComplete = true }
            return n
        case .chunked:
            return try self.consumeChunked(buffer)
        }
    }

    private mutating func consumeChunked(_ buffer: ByteBuffer) throws(HTTPParseError) -> Int {
        let view = buffer.readableBytesView
        var i = view.startIndex
        while i < view.endIndex && !self.isComplete {
            switch self.chunk {
            case .data(let left):
                let n = min(left, view.endIndex - i)
                i += n
                self.chunk = left - n == 0 ? .dataEnd(sawCR: false) : .data(left - n)
                continue
            default:
                break
            }
            let byte = view[i]
            i += 1
            switch self.chunk {
            case .size(let value, let digits):
                if let digit = Self.hexValue(byte) {
                    guard digits < 15 else { throw HTTPParseError("chunk size too large") }
                    self.chunk = .size(value * 16 + digit, digits: digits + 1)
                } else if byte == UInt8(ascii: ";") || byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") {
                    guard digits > 0 else { throw HTTPParseError("chunk size missing") }
                    self.chunk = .sizeExtension(value)
                } else if byte == UInt8(ascii: "\r") {
                    guard digits > 0 else { throw HTTPParseError("chunk size missing") }
                    self.chunk = .sizeExtension(value)
                } else if byte == UInt8(ascii: "\n") {
                    guard digits > 0 else { throw HTTPParseError("chunk size missing") }
                    self.chunk = value == 0 ? .trailerLineStart : .data(value)
                } else {
                    throw HTTPParseError("invalid chunk size")
                }
            case .sizeExtension(let value):
                if byte == UInt8(ascii: "\n") { self.chunk = value == 0 ? .trailerLineStart : .data(value) }
            case .dataEnd(let sawCR):
                if byte == UInt8(ascii: "\r") && !sawCR {
                    self.chunk = .dataEnd(sawCR: true)
                } else if byte == UInt8(ascii: "\n") {
                    self.chunk = .size(0, digits: 0)
                } else {
                    throw HTTPParseError("chunk data not followed by CRLF")
                }
            case .trailerLineStart:
                if byte == UInt8(ascii: "\n") {
                    self.isComplete = true
                } else if byte != UInt8(ascii: "\r") {
                    self.chunk = .trailerLine
                }
            case .trailerLine:
                if byte == UInt8(ascii: "\n") { self.chunk = .trailerLineStart }
            case .data:
                break
            }
        }
        return i - view.startIndex
    }

    private static func hexValue(_ byte: UInt8) -> Int? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return Int(byte - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return Int(byte - UInt8(ascii: "a")) + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return Int(byte - UInt8(ascii: "A")) + 10
        default: return nil
        }
    }

    // MARK: - Which framing a message has (RFC 9112 §6.3)

    /// The framing of a request body.
    public static func forRequest(_ head: HTTPRequestHead) throws(HTTPParseError) -> Mode {
        let encodings = head.headers.tokens("Transfer-Encoding")
        if !encodings.isEmpty {
            guard encodings.last == "chunked" else {
                throw HTTPParseError("request transfer coding must end in chunked")
            }
            return .chunked
        }
        if let length = try self.contentLength(head.headers) { return length == 0 ? .none : .length(length) }
        return .none
    }

    /// The framing of a response body, given the request it answers.
    public static func forResponse(_ head: HTTPResponseHead, requestMethod: String) throws(HTTPParseError) -> Mode {
        if requestMethod == "HEAD" || head.status < 200 || head.status == 204 || head.status == 304 { return .none }
        let encodings = head.headers.tokens("Transfer-Encoding")
        if !encodings.isEmpty { return encodings.last == "chunked" ? .chunked : .untilClose }
        if let length = try self.contentLength(head.headers) { return length == 0 ? .none : .length(length) }
        return .untilClose
    }

    private static func contentLength(_ headers: HTTPHeaders) throws(HTTPParseError) -> Int? {
        let values = headers.values("Content-Length").flatMap { $0.split(separator: ",") }.map {
            $0.trimmingSpacesAndTabs()
        }
        guard let first = values.first else { return nil }
        guard values.allSatisfy({ $0 == first }), first.allSatisfy(\.isASCII), let length = Int(first), length >= 0
        else {
            throw HTTPParseError("invalid Content-Length")
        }
        return length
    }
}
