import TunnelCrypto

/// A one-line invite to a server (README, *Invites*): `tunnel://KEY@HOST:PORT`, where KEY is the server's
/// static public key in URL-safe base64 without padding (RFC 4648 §5), so the whole link survives being pasted
/// into chats, mail and shells unquoted. It names the server and pins its key; the client still brings its
/// own key, which the server's operator must have listed.
public struct InviteLink: Sendable, Equatable, CustomStringConvertible {
    public static let scheme = "tunnel://"

    public var serverKey: PublicKey
    public var server: Endpoint

    public init(serverKey: PublicKey, server: Endpoint) {
        self.serverKey = serverKey
        self.server = server
    }

    public var description: String {
        Self.scheme + Self.urlSafe(self.serverKey.base64) + "@" + self.server.description
    }

    /// Whether `text` is meant as a link (it starts with the scheme), whatever else is wrong with it.
    public static func looksLikeLink(_ text: String) -> Bool {
        text.lowercased().hasPrefix(Self.scheme)
    }

    /// Parses a link; the error says what is wrong with it.
    public static func parse(_ text: String) -> Result<InviteLink, ConfigProblem> {
        guard Self.looksLikeLink(text) else {
            return .failure(ConfigProblem("'\(text)' is not a tunnel:// link"))
        }
        var rest = Substring(text.dropFirst(Self.scheme.count))
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard let at = rest.firstIndex(of: "@") else {
            return .failure(ConfigProblem("the link has no KEY@ before the host (tunnel://KEY@HOST:PORT)"))
        }
        let keyText = rest[..<at]
        guard let key = PublicKey(base64: Self.standard(String(keyText))) else {
            return .failure(ConfigProblem("the link's key '\(keyText)' is not a base64 X25519 public key"))
        }
        switch Endpoint.parse(String(rest[rest.index(after: at)...])) {
        case .success(let endpoint):
            return .success(InviteLink(serverKey: key, server: endpoint))
        case .failure(let problem):
            return .failure(ConfigProblem("the link's address: \(problem.message)"))
        }
    }

    /// Standard base64 to URL-safe, unpadded.
    static func urlSafe(_ base64: String) -> String {
        String(
            base64.compactMap { c -> Character? in
                switch c {
                case "+": "-"
                case "/": "_"
                case "=": nil
                default: c
                }
            }
        )
    }

    /// URL-safe (padded or not) back to standard, padded base64.
    static func standard(_ text: String) -> String {
        var out = String(
            text.map { c -> Character in
                switch c {
                case "-": "+"
                case "_": "/"
                default: c
                }
            }
        )
        while out.count % 4 != 0 { out += "=" }
        return out
    }
}
