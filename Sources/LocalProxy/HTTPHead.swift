import NIOCore
import TunnelProtocol

/// Header fields in order, names as received (compared case-insensitively, RFC 9110 §5.1).
public struct HTTPHeaders: Equatable, Sendable {
    public var fields: [(name: String, value: String)]

    public init(_ fields: [(name: String, value: String)] = []) { self.fields = fields }

    /// All values of `name`.
    public func values(_ name: String) -> [String] {
        self.fields.filter { $0.name.lowercased() == name.lowercased() }.map(\.value)
    }

    /// The comma-separated tokens of every `name` field, lowercased (e.g. `Connection: keep-alive, Upgrade`).
    public func tokens(_ name: String) -> [String] {
        self.values(name).flatMap { $0.split(separator: ",") }.map { $0.trimmingSpacesAndTabs().lowercased() }.filter {
            !$0.isEmpty
        }
    }

    public mutating func remove(_ name: String) {
        let lower = name.lowercased()
        self.fields.removeAll { $0.name.lowercased() == lower }
    }

    public static func == (lhs: HTTPHeaders, rhs: HTTPHeaders) -> Bool {
        lhs.fields.count == rhs.fields.count
            && zip(lhs.fields, rhs.fields).allSatisfy { $0.name == $1.name && $0.value == $1.value }
    }
}

/// A request line and its header fields (RFC 9112 §3).
public struct HTTPRequestHead: Equatable, Sendable {
    public var method: String
    public var target: String
    /// "HTTP/1.1" or "HTTP/1.0".
    public var version: String
    public var headers: HTTPHeaders
}

/// A status line and its header fields (RFC 9112 §4).
public struct HTTPResponseHead: Equatable, Sendable {
    public var version: String
    public var status: Int
    public var reason: String
    public var headers: HTTPHeaders
}

/// Why a message head could not be parsed.
public struct HTTPParseError: Error, Equatable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Parses message heads out of a byte stream. `nil` means the head has not fully arrived; the reader index
/// only moves once a whole head is parsed.
public enum HTTPHeadParser {
    /// Largest head accepted (request line or status line plus all header fields).
    public static let defaultMaxSize = 64 << 10

    /// Bytes up to and including the blank line ending the head, if it has arrived.
    static func headLength(in buffer: ByteBuffer, maxSize: Int) throws(HTTPParseError) -> Int? {
        let view = buffer.readableBytesView
        var index = view.startIndex
        var previousWasLF = false
        while index < view.endIndex {
            let byte = view[index]
            if byte == UInt8(ascii: "\n") {
                if previousWasLF { return index - view.startIndex + 1 }
                previousWasLF = true
            } else if byte != UInt8(ascii: "\r") {
                previousWasLF = false
            }
            index += 1
            if index - view.startIndex > maxSize { throw HTTPParseError("message head larger than \(maxSize) bytes") }
        }
        return nil
    }

    /// Splits a head into lines at LF, dropping a CR before it. Works on bytes: in Swift strings "\r\n" is one
    /// Character, so splitting a String at "\n" would not split it.
    private static func lines(_ bytes: ArraySlice<UInt8>) -> [Substring] {
        bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).map { line in
            let trimmed = line.last == UInt8(ascii: "\r") ? line.dropLast() : line
            return Substring(String(decoding: trimmed, as: UTF8.self))
        }
    }

    private static func parseHeaders(_ lines: ArraySlice<Substring>) throws(HTTPParseError) -> HTTPHeaders {
        var headers = HTTPHeaders()
        for line in lines where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else { throw HTTPParseError("header line without a colon") }
            let name = line[..<colon]
            guard !name.isEmpty, name.allSatisfy(isTokenCharacter) else { throw HTTPParseError("invalid header name") }
            let value = line[line.index(after: colon)...].trimmingSpacesAndTabs()
            guard !value.contains(where: { $0 == "\r" || $0 == "\0" }) else {
                throw HTTPParseError("invalid header value")
            }
            headers.fields.append((String(name), String(value)))
        }
        return headers
    }

    public static func parseRequest(
        _ buffer: inout ByteBuffer,
        maxSize: Int = defaultMaxSize
    ) throws(HTTPParseError) -> HTTPRequestHead? {
        guard let length = try headLength(in: buffer, maxSize: maxSize) else { return nil }
        let bytes = buffer.getBytes(at: buffer.readerIndex, length: length)!
        let all = lines(bytes[...])
        guard let requestLine = all.first else { throw HTTPParseError("empty request") }
        let parts = requestLine.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, parts[0].allSatisfy(isTokenCharacter), !parts[1].isEmpty,
            parts[2] == "HTTP/1.1" || parts[2] == "HTTP/1.0"
        else { throw HTTPParseError("malformed request line") }
        let headers = try parseHeaders(all.dropFirst())
        buffer.moveReaderIndex(forwardBy: length)
        return HTTPRequestHead(
            method: String(parts[0]),
            target: String(parts[1]),
            version: String(parts[2]),
            headers: headers
        )
    }

    public static func parseResponse(
        _ buffer: inout ByteBuffer,
        maxSize: Int = defaultMaxSize
    ) throws(HTTPParseError) -> HTTPResponseHead? {
        guard let length = try headLength(in: buffer, maxSize: maxSize) else { return nil }
        let bytes = buffer.getBytes(at: buffer.readerIndex, length: length)!
        let all = lines(bytes[...])
        guard let statusLine = all.first else { throw HTTPParseError("empty response") }
        let parts = statusLine.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), parts[1].count == 3, let status = Int(parts[1]),
            status >= 100
        else { throw HTTPParseError("malformed status line") }
        let headers = try parseHeaders(all.dropFirst())
        buffer.moveReaderIndex(forwardBy: length)
        return HTTPResponseHead(
            version: String(parts[0]),
            status: status,
            reason: parts.count > 2 ? String(parts[2]) : "",
            headers: headers
        )
    }

    static func isTokenCharacter(_ c: Character) -> Bool {
        guard let ascii = c.asciiValue, ascii > 32, ascii < 127 else { return false }
        return !"\"(),/:;<=>?@[\\]{}".contains(c)
    }
}

extension HTTPRequestHead {
    /// The request as bytes (request line, fields, blank line).
    public func encoded() -> ByteBuffer {
        var out = ByteBuffer()
        out.writeString("\(self.method) \(self.target) \(self.version)\r\n")
        for (name, value) in self.headers.fields { out.writeString("\(name): \(value)\r\n") }
        out.writeString("\r\n")
        return out
    }
}

extension HTTPResponseHead {
    public func encoded() -> ByteBuffer {
        var out = ByteBuffer()
        out.writeString("\(self.version) \(self.status) \(self.reason)\r\n")
        for (name, value) in self.headers.fields { out.writeString("\(name): \(value)\r\n") }
        out.writeString("\r\n")
        return out
    }
}

extension Substring {
    func trimmingSpacesAndTabs() -> Substring {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return s
    }
}
