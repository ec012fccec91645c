import TunnelCrypto

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The server's list of client public keys: one base64 key per line, optionally followed by whitespace and a
/// comment; blank lines and lines starting with `#` are ignored.
public struct AuthorizedKeys: Sendable {
    /// A listed key and its comment.
    public struct Entry: Sendable, Hashable {
        public var key: PublicKey
        public var comment: String
        /// The line of the file it is on (1-based; 0 when not from a file).
        public var line: Int = 0
    }

    public private(set) var entries: [Entry]
    /// Each entry's bytes taken as a private key: the public key that goes with it. A key that connects with
    /// one of these is a client whose PRIVATE key was pasted into the file instead of its public key.
    private let publicKeysIfPrivate: [PublicKey: Int]

    public init(entries: [Entry]) {
        self.entries = entries
        var derived: [PublicKey: Int] = [:]
        for (index, entry) in entries.enumerated() {
            if let asPrivate = PrivateKey(rawBytes: entry.key.bytes) { derived[asPrivate.publicKey] = index }
        }
        self.publicKeysIfPrivate = derived
    }

    /// The entry that is the private key of `key` (someone listed a private key where a public key goes).
    public func entry(holdingPrivateKeyOf key: PublicKey) -> Entry? {
        self.publicKeysIfPrivate[key].map { self.entries[$0] }
    }

    /// Parses the file's text; errors name the line.
    public static func parse(_ text: String) -> Result<AuthorizedKeys, ConfigProblem> {
        var entries: [Entry] = []
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = rawLine.trimmingSpaces()
            guard !line.isEmpty, !line.hasPrefix("#") else { continue }
            let keyText = line.prefix { !$0.isWhitespace }
            let comment = line.dropFirst(keyText.count).trimmingSpaces()
            guard let key = PublicKey(base64: keyText) else {
                return .failure(
                    ConfigProblem("line \(index + 1): '\(keyText.prefix(60))' is not a base64 X25519 public key")
                )
            }
            entries.append(Entry(key: key, comment: String(comment), line: index + 1))
        }
        return .success(AuthorizedKeys(entries: entries))
    }

    /// Reads and parses a file.
    public static func load(from path: String) throws(ConfigError) -> AuthorizedKeys {
        let text: String
        switch readTextFile(path) {
        case .success(let t): text = t
        case .failure(let problem): throw ConfigError("\(path): \(problem.message)")
        }
        switch parse(text) {
        case .success(let keys): return keys
        case .failure(let problem): throw ConfigError("\(path): \(problem.message)")
        }
    }

    /// The entry for `key`, compared in constant time against every entry (no early exit).
    public func entry(for key: PublicKey) -> Entry? {
        var found: Entry? = nil
        for entry in self.entries where entry.key.constantTimeEquals(key) {
            found = entry
        }
        return found
    }
}

extension Substring {
    func trimmingSpaces() -> Substring {
        var s = self
        while let f = s.first, f.isWhitespace { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace { s = s.dropLast() }
        return s
    }
}

/// Reads a whole (small) text file, with a problem description on failure.
func readTextFile(_ path: String, limit: Int = 1 << 20) -> Result<String, ConfigProblem> {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return .failure(ConfigProblem("cannot open: \(String(cString: strerror(errno)))")) }
    defer { close(fd) }
    var info = stat()
    guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else {
        return .failure(ConfigProblem("not a regular file"))
    }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if n < 0 {
            if errno == EINTR { continue }
            return .failure(ConfigProblem("cannot read: \(String(cString: strerror(errno)))"))
        }
        if n == 0 { break }
        bytes += chunk[0..<n]
        guard bytes.count <= limit else { return .failure(ConfigProblem("file is larger than \(limit) bytes")) }
    }
    guard let text = String(validating: bytes, as: UTF8.self) else {
        return .failure(ConfigProblem("not valid UTF-8 text"))
    }
    return .success(text)
}
