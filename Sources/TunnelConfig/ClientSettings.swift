import TunnelCrypto
import TunnelProtocol

/// Everything `tunnel-client` runs with: defaults, then the config file, then flags.
public struct ClientSettings: Sendable {
    /// Which AEAD the client proposes.
    public enum CipherChoice: Sendable, Equatable {
        /// AES-256-GCM where this CPU has AES-NI, ChaCha20-Poly1305 otherwise (and as a fallback when the
        /// server does not take AES-GCM).
        case automatic
        case fixed(NoiseCipher)
    }

    /// When a CONNECT is answered before the server's result (README, *Fast open*).
    public enum FastOpen: String, Sendable, Equatable, CaseIterable {
        /// For destinations the server reached recently: the application's first bytes go with the open.
        case auto
        /// For every destination: speed over exact reply codes (a failure shows as a reset).
        case always
        /// Never: every CONNECT waits for the server's result.
        case never

        public static func parse(_ text: String, origin: String) throws(ConfigError) -> FastOpen {
            try Self.choice(text, origin: origin)
        }
    }

    /// Which event loop carries the SOCKS port and the tunnel (README, *Performance*).
    /// One server the client may use: its address, and the key its `tunnel://` link named (else `server_key`).
    public struct ServerEntry: Sendable, Equatable {
        public var endpoint: Endpoint
        public var key: PublicKey?
        public init(endpoint: Endpoint, key: PublicKey? = nil) {
            self.endpoint = endpoint
            self.key = key
        }
    }

    /// The servers, in order of preference (README, *Several servers*): the client uses the first that answers.
    public var servers: [ServerEntry] = []
    /// The key of every server whose entry does not name its own (one shared key for a pool).
    public var serverKey: PublicKey?
    public var keyPath: String?
    public var socks = Endpoint(host: "127.0.0.1", port: 1080)
    /// Username and password the local proxy requires (SOCKS5 RFC 1929, SOCKS4 user id, HTTP Basic).
    public var socksUser: String?
    public var socksPassword: String?
    /// Allow the local proxy on a non-loopback address without credentials.
    public var allowOpenProxy = false
    /// Ask the server to compress stream data (off by default; see the README on when it is safe).
    public var compress = false
    /// Serve SOCKS5 UDP ASSOCIATE.
    public var udp = true
    public var fastOpen = FastOpen.auto
    /// The event loop asked for; nil: our own, except with the full tunnel (its device still needs NIO's).
    public var eventLoop: EventLoopKind?
    /// A UDP association with no traffic for this long is closed (with its control connection).
    public var udpIdleTimeout: Int64 = 120_000_000_000
    public var logLevel = "info"
    /// "text" (one readable line per event) or "json" (one JSON object per line).
    public var logFormat = "text"
    /// The control socket `status` and `reload` talk to: nil for the default path, "none" (or "") for none.
    public var controlSocket: String?
    /// Where Prometheus metrics are served (`GET /metrics`); nil: nowhere (the default).
    public var metrics: Endpoint?
    public var cipher = CipherChoice.automatic
    /// How long a SOCKS request waits for the tunnel to come (back) up before it is refused.
    public var connectWait: Int64 = 10_000_000_000
    /// Most SOCKS requests waiting for the tunnel at once.
    public var maxWaitingRequests = 4096
    /// Longest pause between reconnect attempts.
    public var reconnectMax: Int64 = 30_000_000_000
    public var timings = TunnelTimings()
    /// Full-tunnel mode (`--full-tunnel`).
    public var fullTunnel = ClientFullTunnelSettings()

    public init() {}

    public mutating func apply(file: inout ConfigFile) throws(ConfigError) {
        if let v = try file.string("server") { try self.setServer(v, origin: file.location("server")) }
        if let list = try file.strings("servers") {
            guard self.servers.isEmpty else {
                throw ConfigError("\(file.location("servers")) and server: give one of them")
            }
            guard !list.isEmpty else { throw ConfigError("\(file.location("servers")) is empty") }
            for text in list { self.servers.append(try Self.parseServer(text, origin: file.location("servers"))) }
        }
        if let v = try file.string("server_key") {
            guard let key = PublicKey(base64: v) else {
                throw ConfigError("\(file.location("server_key")) is not a base64 X25519 public key")
            }
            self.serverKey = key
        }
        if let v = try file.string("key") { self.keyPath = v }
        if let v = try file.endpoint("socks") { self.socks = v }
        if let v = try file.string("socks_user") { self.socksUser = v }
        if let v = try file.string("socks_pass") { self.socksPassword = v }
        if let v = try file.string("socks_pass_file") {
            self.socksPassword = try Self.readPasswordFile(v, origin: file.location("socks_pass_file"))
        }
        if let v = try file.boolean("allow_open_proxy") { self.allowOpenProxy = v }
        if let v = try file.boolean("udp") { self.udp = v }
        if let v = try file.boolean("compress") { self.compress = v }
        if let v = try file.string("fast_open") {
            self.fastOpen = try FastOpen.parse(v, origin: file.location("fast_open"))
        }
        if let v = try file.duration("udp_idle_timeout", min: 1_000_000_000) { self.udpIdleTimeout = v }
        if let v = try file.string("event_loop") {
            self.eventLoop = try EventLoopKind.parse(v, origin: file.location("event_loop"))
        }
        if let v = try file.string("log_level") {
            self.logLevel = try LogLevelName.validate(v, origin: file.location("log_level"))
        }
        if let v = try file.string("cipher") {
            guard let choice = Self.parseCipher(v) else {
                throw ConfigError("\(file.location("cipher")): unknown cipher '\(v)' (auto, aesgcm, chachapoly)")
            }
            self.cipher = choice
        }
        if let v = try file.duration("connect_wait") { self.connectWait = v }
        if let v = try file.integer("max_waiting_requests", range: 0...1_000_000) { self.maxWaitingRequests = v }
        if let v = try file.duration("reconnect_max", min: 100_000_000) { self.reconnectMax = v }
        if let v = try file.string("control_socket") { self.controlSocket = v }
        if let v = try file.string("log_format") {
            self.logFormat = try LogFormatName.validate(v, origin: file.location("log_format"))
        }
        if let v = try file.endpoint("metrics") { self.metrics = v }
        try self.timings.apply(&file)
        try self.fullTunnel.apply(file: &file)
        try file.finish()
    }

    /// Whether `host` only accepts connections from this machine.
    public static func isLoopback(_ host: String) -> Bool {
        if host == "localhost" { return true }
        guard let ip = IPAddress.parse(host) else { return false }
        return IPAddress.isLoopback(ip.bytes)
    }

    public static func parseCipher(_ text: String) -> CipherChoice? {
        if text.lowercased() == "auto" { return .automatic }
        return NoiseCipher.parse(text).map { .fixed($0) }
    }

    /// What the client needs to run, with its key loaded.
    public struct Resolved: Sendable {
        /// A server with its key.
        public struct Server: Sendable, Equatable {
            public var endpoint: Endpoint
            public var key: PublicKey
        }

        public var settings: ClientSettings
        /// The servers in order of preference (at least one).
        public var servers: [Server]
        public var key: PrivateKey
        public var keyFileInsecure: Bool
        /// The first server (full tunnel: the only one).
        public var server: Endpoint { self.servers[0].endpoint }
    }

    /// The password in a file (`--socks-pass-file`): its first line, without the line end.
    public static func readPasswordFile(_ path: String, origin: String) throws(ConfigError) -> String {
        let text: String
        switch readTextFile(path, limit: 4096) {
        case .success(let t): text = t
        case .failure(let problem): throw ConfigError("\(origin): \(path): \(problem.message)")
        }
        let line = text.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        let password = line.hasSuffix("\r") ? String(line.dropLast()) : String(line)
        guard !password.isEmpty else {
            throw ConfigError("\(origin): \(path): the first line is empty (it holds the password)")
        }
        return password
    }

    /// `--server` or `server`: HOST:PORT, or an invite link (`tunnel://KEY@HOST:PORT`) that names the key too.
    /// Replaces the list with this one server.
    public mutating func setServer(_ text: String, origin: String) throws(ConfigError) {
        self.servers = [try Self.parseServer(text, origin: origin)]
    }

    /// One entry of the server list: HOST:PORT or a `tunnel://` link.
    public static func parseServer(_ text: String, origin: String) throws(ConfigError) -> ServerEntry {
        if InviteLink.looksLikeLink(text) {
            switch InviteLink.parse(text) {
            case .success(let link): return ServerEntry(endpoint: link.server, key: link.serverKey)
            case .failure(let problem): throw ConfigError("\(origin): \(problem.message)")
            }
        }
        switch Endpoint.parse(text) {
        case .success(let endpoint): return ServerEntry(endpoint: endpoint)
        case .failure(let problem): throw ConfigError("\(origin): \(problem.message) (or a tunnel:// invite link)")
        }
    }

    public func resolve() throws(ConfigError) -> Resolved {
        guard !self.servers.isEmpty else {
            throw ConfigError("--server HOST:PORT or a tunnel:// invite link is required (or server in --config)")
        }
        var servers: [Resolved.Server] = []
        for entry in self.servers {
            // One server named twice (a link and --server-key) must agree; in a list, a link's key is its own
            // and the shared key serves the entries without one.
            if self.servers.count == 1, let fromLink = entry.key, let given = self.serverKey, fromLink != given {
                throw ConfigError(
                    "--server-key differs from the key in the tunnel:// link of \(entry.endpoint): give one of them"
                )
            }
            guard let key = entry.key ?? self.serverKey else {
                throw ConfigError(
                    self.servers.count == 1
                        ? "--server-key BASE64 is required (or server_key in --config)"
                        : "\(entry.endpoint) has no key: give --server-key (shared by the servers without a tunnel:// link)"
                )
            }
            servers.append(Resolved.Server(endpoint: entry.endpoint, key: key))
        }
        if self.fullTunnel.enabled && servers.count > 1 {
            throw ConfigError("--full-tunnel takes one server (its routes are made for that address)")
        }
        guard let keyPath = self.keyPath else { throw ConfigError("--key PATH is required (or key in --config)") }
        switch (self.socksUser, self.socksPassword) {
        case (nil, nil): break
        case (let user?, let pass?):
            guard !user.isEmpty, user.utf8.count <= 255, pass.utf8.count <= 255, !pass.isEmpty else {
                throw ConfigError("--socks-user and --socks-pass must each be 1 to 255 bytes")
            }
        default:
            throw ConfigError("--socks-user and --socks-pass go together")
        }
        if !Self.isLoopback(self.socks.host) && self.socksUser == nil && !self.allowOpenProxy {
            throw ConfigError(
                "--socks \(self.socks) is not a loopback address: anyone who reaches it could use your tunnel. "
                    + "Set --socks-user/--socks-pass, or pass --allow-open-proxy if that is really intended"
            )
        }
        if case .fixed(let cipher) = self.cipher, !cipher.isAvailable {
            throw ConfigError("cipher \(cipher) is not available on this CPU")
        }
        let loaded: (key: PrivateKey, insecureMode: Bool)
        do {
            loaded = try KeyFile.load(from: keyPath)
        } catch {
            throw ConfigError(error.description)
        }
        return Resolved(
            settings: self,
            servers: servers,
            key: loaded.key,
            keyFileInsecure: loaded.insecureMode
        )
    }
}
