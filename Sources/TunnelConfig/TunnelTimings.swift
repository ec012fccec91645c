/// Timers and windows both ends share, settable from either config file.
public struct TunnelTimings: Sendable, Equatable {
    /// Nanoseconds the Noise handshake may take.
    public var handshakeTimeout: Int64 = 10_000_000_000
    /// A PING goes out after this long without receiving anything.
    public var keepaliveInterval: Int64 = 15_000_000_000
    /// The tunnel is declared dead after this long without receiving anything.
    public var deadTimeout: Int64 = 45_000_000_000
    /// On SIGINT/SIGTERM, open streams get this long to finish.
    public var drainTimeout: Int64 = 5_000_000_000
    /// After the connection breaks, how long both ends keep the session (its streams and sockets) for the
    /// client to resume it over a new connection (docs/PROTOCOL.md §7); 0 turns resumption off.
    public var resumeGrace: Int64 = 60_000_000_000
    /// With resumption on, a connection whose sent data stays unacknowledged this long is given up
    /// (`TCP_USER_TIMEOUT`) and the session resumed over a new one: a path gone silent under traffic is found
    /// in seconds, not after the kernel's retransmissions (many minutes) or `dead_timeout`.
    public var unackedTimeout: Int64 = 10_000_000_000
    /// Receive window each stream starts with.
    public var streamWindow = 1 << 20
    /// Largest a stream's receive window auto-tunes to.
    public var maxStreamWindow = 4 << 20
    /// Receive window of the whole connection.
    public var connectionWindow = 16 << 20
    /// Most streams the peer may have open at once.
    public var maxStreams = 16384
    /// Rekey after this many bytes in one direction.
    public var rekeyBytes = 1 << 30
    /// TCP congestion control of the tunnel connection: `auto` (BBR where the kernel offers it, else the
    /// system default), `system` (leave the system default), or an algorithm name (`cubic`, `bbr`, ...).
    public var congestionControl = "auto"

    public init() {}

    /// Reads the shared keys from a config file.
    public mutating func apply(_ file: inout ConfigFile) throws(ConfigError) {
        if let v = try file.duration("handshake_timeout", min: 100_000_000) { self.handshakeTimeout = v }
        if let v = try file.duration("keepalive_interval", min: 100_000_000) { self.keepaliveInterval = v }
        if let v = try file.duration("dead_timeout", min: 1_000_000_000) { self.deadTimeout = v }
        if let v = try file.duration("drain_timeout") { self.drainTimeout = v }
        if let v = try file.duration("resume_grace") { self.resumeGrace = v }
        if let v = try file.duration("unacked_timeout", min: 1_000_000_000) { self.unackedTimeout = v }
        if let v = try file.byteSize("stream_window", range: 65536...(1 << 30)) { self.streamWindow = v }
        if let v = try file.byteSize("max_stream_window", range: 65536...(1 << 30)) { self.maxStreamWindow = v }
        if let v = try file.byteSize("connection_window", range: 65536...(1 << 30)) { self.connectionWindow = v }
        if let v = try file.integer("max_streams", range: 1...1_000_000) { self.maxStreams = v }
        if let v = try file.byteSize("rekey_bytes", range: (1 << 16)...(1 << 40)) { self.rekeyBytes = v }
        if let v = try file.string("congestion_control") {
            let valid =
                !v.isEmpty && v.utf8.count <= 15
                && v.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5F }
            guard valid else {
                throw ConfigError(
                    "\(file.location("congestion_control")) must be auto, system, or an algorithm name like cubic or bbr"
                )
            }
            self.congestionControl = v
        }
        guard self.maxStreamWindow >= self.streamWindow else {
            throw ConfigError("\(file.location("max_stream_window")) must be at least stream_window")
        }
        guard self.deadTimeout > self.keepaliveInterval else {
            throw ConfigError("\(file.location("dead_timeout")) must be longer than keepalive_interval")
        }
    }
}
