import TunnelCrypto
import TunnelProtocol

/// Everything `tunnel-server` runs with: defaults, then the config file, then flags.
public struct ServerSettings: Sendable {
    public var listen: Endpoint?
    /// A port that answers health checks (README, *Several servers*); nil: none.
    public var health: Endpoint?
    public var keyPath: String?
    public var authorizedKeysPath: String?
    public var logLevel = "info"
    /// "text" (one readable line per event) or "json" (one JSON object per line).
    public var logFormat = "text"
    /// The control socket `status` and `reload` talk to: nil for the default path, "none" (or "") for none.
    public var controlSocket: String?
    /// Where Prometheus metrics are served (`GET /metrics`); nil: nowhere (the default).
    public var metrics: Endpoint?
    /// Outbound connects give up after this long (SOCKS reply 0x06).
    public var connectTimeout: Int64 = 10_000_000_000
    /// Destinations the server refuses to connect to (SOCKS reply 0x02) beside `DestinationPolicy.builtInDeny`,
    /// the unspecified addresses and the host's own addresses.
    public var deny: [CIDR] = []
    /// Prefixes exempt from the deny rules (`--allow`, repeatable; `allow = [...]`).
    public var allow: [CIDR] = []
    /// What the server may reach.
    public var destinationPolicy: DestinationPolicy { DestinationPolicy(deny: self.deny, allow: self.allow) }
    /// AEADs accepted from clients, tried in this order.
    public var ciphers: [NoiseCipher] = [.aesGCM, .chaChaPoly]
    /// Most unauthenticated connections handshaking at once; more are closed at once.
    public var maxPendingHandshakes = 256
    /// Accept a client's request to compress stream data.
    public var allowCompression = true
    /// A UDP association with no traffic for this long is closed.
    public var udpIdleTimeout: Int64 = 300_000_000_000
    public var timings = TunnelTimings()
    /// Full-tunnel mode (`--tun`).
    public var tun = ServerTUNSettings()
    /// Which event loops carry the tunnel connections and their outbound sockets; nil: ours (one per core)
    /// unless `--tun` is on.
    public var eventLoop: EventLoopKind?

    public init() {}

    /// Applies a config file's settings (flags are applied after this, by the caller).
    public mutating func apply(file: inout ConfigFile) throws(ConfigError) {
        if let v = try file.endpoint("listen") { self.listen = v }
        if let v = try file.endpoint("health") { self.health = v }
        if let v = try file.string("key") { self.keyPath = v }
        if let v = try file.string("authorized_keys") { self.authorizedKeysPath = v }
        if let v = try file.string("log_level") {
            self.logLevel = try LogLevelName.validate(v, origin: file.location("log_level"))
        }
        if let v = try file.duration("connect_timeout", min: 1_000_000) { self.connectTimeout = v }
        if let v = try file.integer("max_pending_handshakes", range: 1...100_000) { self.maxPendingHandshakes = v }
        if let v = try file.duration("udp_idle_timeout", min: 1_000_000_000) { self.udpIdleTimeout = v }
        if let v = try file.string("control_socket") { self.controlSocket = v }
        if let v = try file.string("log_format") {
            self.logFormat = try LogFormatName.validate(v, origin: file.location("log_format"))
        }
        if let v = try file.endpoint("metrics") { self.metrics = v }
        if let v = try file.boolean("allow_compression") { self.allowCompression = v }
        if let v = try file.string("event_loop") {
            self.eventLoop = try EventLoopKind.parse(v, origin: file.location("event_loop"))
        }
        if let list = try file.strings("deny") { self.deny = try CIDR.parseList(list, origin: file.location("deny")) }
        if let list = try file.strings("allow") {
            self.allow = try CIDR.parseList(list, origin: file.location("allow"))
        }
        if let list = try file.strings("ciphers") {
            self.ciphers = []
            for text in list {
                guard let cipher = NoiseCipher.parse(text) else {
                    throw ConfigError("\(file.location("ciphers")): unknown cipher '\(text)' (aesgcm, chachapoly)")
                }
                self.ciphers.append(cipher)
            }
            guard !self.ciphers.isEmpty else {
                throw ConfigError("\(file.location("ciphers")): must list at least one cipher")
            }
        }
        try self.timings.apply(&file)
        try self.tun.apply(file: &file)
        try file.finish()
    }

    /// What the server needs to run, with its key files loaded.
    public struct Resolved: Sendable {
        public var settings: ServerSettings
        public var listen: Endpoint
        public var key: PrivateKey
        public var keyFileInsecure: Bool
        public var authorizedKeys: AuthorizedKeys
    }

    /// Checks that everything required is set and loads the key files.
    public func resolve() throws(ConfigError) -> Resolved {
        guard let listen = self.listen else {
            throw ConfigError("--listen HOST:PORT is required (or listen in --config)")
        }
        guard let keyPath = self.keyPath else { throw ConfigError("--key PATH is required (or key in --config)") }
        guard let authorizedPath = self.authorizedKeysPath else {
            throw ConfigError("--authorized-keys PATH is required (or authorized_keys in --config)")
        }
        let loaded: (key: PrivateKey, insecureMode: Bool)
        do {
            loaded = try KeyFile.load(from: keyPath)
        } catch {
            throw ConfigError(error.description)
        }
        let authorized = try AuthorizedKeys.load(from: authorizedPath)
        if let entry = authorized.entry(holdingPrivateKeyOf: loaded.key.publicKey) {
            throw ConfigError(
                "\(authorizedPath): line \(entry.line) is the server's own PRIVATE key (the file given as --key), not a client's public key. "
                    + "List each client's public key (tunnel-client pubkey --key CLIENT.key prints it)"
            )
        }
        guard self.ciphers.contains(where: \.isAvailable) else {
            throw ConfigError("none of the configured ciphers is available on this CPU (add chachapoly)")
        }
        return Resolved(
            settings: self,
            listen: listen,
            key: loaded.key,
            keyFileInsecure: loaded.insecureMode,
            authorizedKeys: authorized
        )
    }
}

extension NoiseCipher {
    /// Parses a config name: `aesgcm` / `aes-256-gcm`, `chachapoly` / `chacha20-poly1305`.
    public static func parse(_ text: String) -> NoiseCipher? {
        switch text.lowercased() {
        case "aesgcm", "aes-256-gcm", "aes256gcm", "aes": return .aesGCM
        case "chachapoly", "chacha20-poly1305", "chacha20poly1305", "chacha": return .chaChaPoly
        default: return nil
        }
    }
}
