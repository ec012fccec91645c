import TunnelCrypto

/// Everything `tunnel-client` runs with: defaults, then the config file, then flags.
public struct ClientSettings: Sendable {
    /// Which AEAD the client proposes.
    public enum CipherChoice: Sendable, Equatable {
        /// AES-256-GCM where this CPU has AES-NI, ChaCha20-Poly1305 otherwise (and as a fallback when the
        /// server does not take AES-GCM).
        case automatic
        case fixed(NoiseCipher)
    }

    public var server: Endpoint?
    public var serverKey: PublicKey?
    public var keyPath: String?
    public var socks = Endpoint(host: "127.0.0.1", port: 1080)
    public var logLevel = "info"
    public var cipher = CipherChoice.automatic
    /// How long a SOCKS request waits for the tunnel to come (back) up before it is refused.
    public var connectWait: Int64 = 10_000_000_000
    /// Most SOCKS requests waiting for the tunnel at once.
    public var maxWaitingRequests = 4096
    /// Longest pause between reconnect attempts.
    public var reconnectMax: Int64 = 30_000_000_000
    public var timings = TunnelTimings()

    public init() {}

    public mutating func apply(file: inout ConfigFile) throws(ConfigError) {
        if let v = try file.endpoint("server") { self.server = v }
        if let v = try file.string("server_key") {
            guard let key = PublicKey(base64: v) else { throw ConfigError("\(file.path): server_key is not a base64 X25519 public key") }
            self.serverKey = key
        }
        if let v = try file.string("key") { self.keyPath = v }
        if let v = try file.endpoint("socks") { self.socks = v }
        if let v = try file.string("log_level") { self.logLevel = try LogLevelName.validate(v, origin: "\(file.path): log_level") }
        if let v = try file.string("cipher") {
            guard let choice = Self.parseCipher(v) else {
                throw ConfigError("\(file.path): cipher: unknown cipher '\(v)' (auto, aesgcm, chachapoly)")
            }
            self.cipher = choice
        }
        if let v = try file.duration("connect_wait") { self.connectWait = v }
        if let v = try file.integer("max_waiting_requests", range: 0...1_000_000) { self.maxWaitingRequests = v }
        if let v = try file.duration("reconnect_max", min: 100_000_000) { self.reconnectMax = v }
        try self.timings.apply(&file)
        try file.finish()
    }

    public static func parseCipher(_ text: String) -> CipherChoice? {
        if text.lowercased() == "auto" { return .automatic }
        return NoiseCipher.parse(text).map { .fixed($0) }
    }

    /// What the client needs to run, with its key loaded.
    public struct Resolved: Sendable {
        public var settings: ClientSettings
        public var server: Endpoint
        public var serverKey: PublicKey
        public var key: PrivateKey
        public var keyFileInsecure: Bool
    }

    public func resolve() throws(ConfigError) -> Resolved {
        guard let server = self.server else { throw ConfigError("--server HOST:PORT is required (or server in --config)") }
        guard let serverKey = self.serverKey else { throw ConfigError("--server-key BASE64 is required (or server_key in --config)") }
        guard let keyPath = self.keyPath else { throw ConfigError("--key PATH is required (or key in --config)") }
        if case .fixed(let cipher) = self.cipher, !cipher.isAvailable {
            throw ConfigError("cipher \(cipher) is not available on this CPU")
        }
        let loaded: (key: PrivateKey, insecureMode: Bool)
        do {
            loaded = try KeyFile.load(from: keyPath)
        } catch {
            throw ConfigError(error.description)
        }
        return Resolved(settings: self, server: server, serverKey: serverKey, key: loaded.key, keyFileInsecure: loaded.insecureMode)
    }
}
