import NIOCore
import TunnelCrypto
import TunnelProtocol

/// What the local proxy does with one HTTP request (RFC 9110 §9.3.6 CONNECT, RFC 9112 §3.2.2 absolute-form).
public enum HTTPProxyDecision: Equatable, Sendable {
    /// `CONNECT host:port`: open a stream, answer 200, then relay bytes.
    case tunnel(TargetAddress)
    /// `METHOD http://host[:port]/path`: open (or reuse) a stream to the origin and send it `head` (origin-form,
    /// hop-by-hop fields removed), followed by the body.
    case forward(TargetAddress, head: HTTPRequestHead, body: HTTPBodyFramer.Mode, closeAfter: Bool)
    /// Answer with this status and close.
    case reject(status: Int, message: String, authenticate: Bool)
}

public enum HTTPProxy {
    /// Hop-by-hop fields (RFC 9110 §7.6.1) a proxy must not forward.
    static let hopByHop: Set<String> = [
        "connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "te", "trailer",
        "upgrade",
    ]

    /// Decides what to do with a request head the application sent to the proxy.
    public static func decide(_ head: HTTPRequestHead, credentials: ProxyCredentials?) -> HTTPProxyDecision {
        if let credentials, !self.authorized(head.headers, credentials: credentials) {
            return .reject(status: 407, message: "Proxy authentication required", authenticate: true)
        }
        if head.method == "CONNECT" {
            guard let target = self.parseAuthority(Substring(head.target), defaultPort: nil) else {
                return .reject(status: 400, message: "CONNECT needs host:port", authenticate: false)
            }
            return .tunnel(target)
        }
        let lower = head.target.lowercased()
        guard lower.hasPrefix("http://") else {
            if lower.hasPrefix("https://") {
                return .reject(status: 400, message: "use CONNECT for https", authenticate: false)
            }
            return .reject(status: 400, message: "a proxy request needs an absolute http:// URI", authenticate: false)
        }
        let rest = head.target.dropFirst("http://".count)
        let authorityEnd = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
        let authority = rest[..<authorityEnd]
        guard !authority.contains("@"), let target = self.parseAuthority(authority, defaultPort: 80) else {
            return .reject(status: 400, message: "invalid host in the request URI", authenticate: false)
        }
        var path = String(rest[authorityEnd...])
        if let fragment = path.firstIndex(of: "#") { path = String(path[..<fragment]) }
        if path.isEmpty || path.hasPrefix("?") { path = "/" + path }

        let body: HTTPBodyFramer.Mode
        do {
            body = try HTTPBodyFramer.forRequest(head)
        } catch {
            return .reject(status: 400, message: error.description, authenticate: false)
        }
        let connectionTokens = Set(head.headers.tokens("Connection") + head.headers.tokens("Proxy-Connection"))
        let closeAfter =
            connectionTokens.contains("close")
            || (head.version == "HTTP/1.0" && !connectionTokens.contains("keep-alive"))
        var headers = HTTPHeaders()
        let dropped = self.hopByHop.union(head.headers.tokens("Connection"))
        for field in head.headers.fields where !dropped.contains(field.name.lowercased()) {
            headers.fields.append(field)
        }
        // Both Transfer-Encoding and Content-Length: the transfer coding frames the body, and an intermediary
        // must not pass the Content-Length on (RFC 9112 §6.3): a server behind it that read that instead
        // would see a second, smuggled request in the body.
        if !head.headers.tokens("Transfer-Encoding").isEmpty { headers.remove("Content-Length") }
        if headers.values("Host").isEmpty {
            headers.fields.insert(("Host", String(authority)), at: 0)
        }
        if closeAfter { headers.fields.append(("Connection", "close")) }
        let rewritten = HTTPRequestHead(method: head.method, target: path, version: head.version, headers: headers)
        return .forward(target, head: rewritten, body: body, closeAfter: closeAfter)
    }

    /// `Proxy-Authorization: Basic base64(user:pass)` (RFC 7617), compared in constant time.
    static func authorized(_ headers: HTTPHeaders, credentials: ProxyCredentials) -> Bool {
        for value in headers.values("Proxy-Authorization") {
            let parts = value.split(separator: " ", maxSplits: 1)
            guard parts.count == 2, parts[0].lowercased() == "basic",
                let decoded = base64Decode(parts[1].trimmingSpacesAndTabs())
            else { continue }
            guard let colon = decoded.firstIndex(of: UInt8(ascii: ":")) else { continue }
            if credentials.matches(username: Array(decoded[..<colon]), password: Array(decoded[(colon + 1)...])) {
                return true
            }
        }
        return false
    }

    /// `host:port`, `[v6]:port`, or (with a default port) just a host.
    static func parseAuthority(_ text: Substring, defaultPort: UInt16?) -> TargetAddress? {
        var host: Substring
        var portText: Substring?
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            host = text[text.index(after: text.startIndex)..<close]
            let after = text[text.index(after: close)...]
            if after.hasPrefix(":") { portText = after.dropFirst() } else if !after.isEmpty { return nil }
            guard IPAddress.parse(String(host))?.isIPv6 == true else { return nil }
        } else if let colon = text.lastIndex(of: ":") {
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        } else {
            host = text
        }
        let port: UInt16
        if let portText {
            guard let p = UInt16(portText), p > 0 else { return nil }
            port = p
        } else {
            guard let defaultPort else { return nil }
            port = defaultPort
        }
        guard !host.isEmpty, host.allSatisfy({ $0.isASCII && !$0.isWhitespace }) else { return nil }
        return TargetAddress(host: String(host), port: port)
    }

    /// The status line an open failure becomes (RFC 9110 §15.6.3 502, §15.6.5 504).
    public static func status(for reply: ReplyCode) -> (Int, String) {
        switch reply {
        case .ttlExpired: return (504, "Gateway Timeout")
        case .notAllowed: return (403, "Forbidden")
        default: return (502, "Bad Gateway")
        }
    }

    /// A complete error response that closes the connection.
    public static func errorResponse(status: Int, message: String, authenticate: Bool = false) -> ByteBuffer {
        let reason: String =
            switch status {
            case 400: "Bad Request"
            case 403: "Forbidden"
            case 407: "Proxy Authentication Required"
            case 501: "Not Implemented"
            case 502: "Bad Gateway"
            case 504: "Gateway Timeout"
            default: "Error"
            }
        let body = "\(status) \(reason): \(message)\n"
        var out = ByteBuffer()
        out.writeString("HTTP/1.1 \(status) \(reason)\r\n")
        if authenticate { out.writeString("Proxy-Authenticate: Basic realm=\"tunnel\"\r\n") }
        out.writeString(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n"
        )
        out.writeString(body)
        return out
    }

    /// The answer to a successful CONNECT.
    public static let connectEstablished = "HTTP/1.1 200 Connection established\r\n\r\n"
}

/// Standard base64 for the Basic scheme (padding optional), through libsodium's constant-time codec.
func base64Decode(_ text: Substring) -> [UInt8]? {
    Base64.decode(bytes: Array(text.utf8), paddingOptional: true)
}
