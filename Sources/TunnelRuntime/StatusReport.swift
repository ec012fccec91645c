import NIOCore
import TunnelProtocol
import TunnelTransport

/// What `tunnel-client status` and `tunnel-server status` show: the reports the running process sends over
/// its control socket (JSON, README *Operating it*), and what they are made of.

/// Traffic of one session, or of all of them: stream bytes as the applications see them (`payload`), and
/// records as they cross the network (`wire`: with compression, fewer; with encryption and framing, a little
/// more).
public struct TrafficFigures: Codable, Sendable, Equatable {
    public var payloadSent = 0
    public var payloadReceived = 0
    public var wireSent = 0
    public var wireReceived = 0
    /// Streams open now, and opened since the start.
    public var streamsOpen = 0
    public var streamsTotal = 0
    public var datagramsSent = 0
    public var datagramsReceived = 0
    /// Datagrams this end dropped because the tunnel had no room for them.
    public var datagramsDropped = 0

    public init() {}

    /// The figures of one tunnel connection's session.
    public init(_ tunnel: TunnelConnectionHandler) {
        self.wireSent = tunnel.wireBytesSent
        self.wireReceived = tunnel.wireBytesReceived
        guard let mux = tunnel.multiplexer else { return }
        self.payloadSent = mux.payloadBytesSent
        self.payloadReceived = mux.payloadBytesReceived
        self.streamsOpen = mux.streamCount
        self.streamsTotal = mux.streamsOpened
        self.datagramsSent = mux.datagramsSent
        self.datagramsReceived = mux.datagramsReceived
        self.datagramsDropped = mux.droppedDatagrams
    }

    /// Adds `other` (its open streams too: a total of live sessions).
    public mutating func add(_ other: TrafficFigures) {
        self.payloadSent += other.payloadSent
        self.payloadReceived += other.payloadReceived
        self.wireSent += other.wireSent
        self.wireReceived += other.wireReceived
        self.streamsOpen += other.streamsOpen
        self.streamsTotal += other.streamsTotal
        self.datagramsSent += other.datagramsSent
        self.datagramsReceived += other.datagramsReceived
        self.datagramsDropped += other.datagramsDropped
    }

    /// The figures of a session that ended: what it carried stays in the totals, its streams are closed.
    public var ended: TrafficFigures {
        var figures = self
        figures.streamsOpen = 0
        return figures
    }
}

/// One open stream (`status --streams`).
public struct StreamReport: Codable, Sendable, Equatable {
    public var id: UInt32
    /// "tcp" or "udp".
    public var kind: String
    public var destination: String
    public var ageSeconds: Double
    public var bytesSent: Int
    public var bytesReceived: Int

    /// The open streams of `tunnel`, oldest first.
    public static func list(_ tunnel: TunnelConnectionHandler, now: NIODeadline) -> [StreamReport] {
        guard let mux = tunnel.multiplexer else { return [] }
        return mux.allStreams.map { stream in
            StreamReport(
                id: stream.id.rawValue,
                kind: stream.kind == .udp ? "udp" : "tcp",
                destination: "\(stream.target)",
                ageSeconds: seconds(now - stream.openedAt),
                bytesSent: stream.bytesSent,
                bytesReceived: stream.bytesReceived
            )
        }
        .sorted { $0.ageSeconds > $1.ageSeconds }
    }
}

/// `tunnel-client status`.
public struct ClientReport: Codable, Sendable, Equatable {
    public var server: String
    public var serverKey: String
    /// "connected", "resuming" (the connection broke; the session waits for a new one), "connecting"
    /// (no tunnel yet, or reconnecting after one was lost), "stopping".
    public var state: String
    /// Seconds in this state.
    public var stateSeconds: Double
    /// Seconds the current session has been up (across resumes), and its current connection.
    public var sessionSeconds: Double?
    public var connectionSeconds: Double?
    public var rttMilliseconds: Double?
    public var minRttMilliseconds: Double?
    /// Tunnels established after the first, and sessions resumed over a new connection.
    public var reconnects: Int
    public var resumes: Int
    /// Streams opened before the server's answer (fast open), and how many of those failed after.
    public var fastOpens: Int
    public var fastOpenFailures: Int
    /// Requests waiting for the tunnel now.
    public var waiting: Int
    public var traffic: TrafficFigures
    public var streams: [StreamReport]?

    public init(
        server: String,
        serverKey: String,
        state: String,
        stateSeconds: Double,
        reconnects: Int,
        resumes: Int,
        fastOpens: Int,
        fastOpenFailures: Int,
        waiting: Int,
        traffic: TrafficFigures
    ) {
        self.server = server
        self.serverKey = serverKey
        self.state = state
        self.stateSeconds = stateSeconds
        self.reconnects = reconnects
        self.resumes = resumes
        self.fastOpens = fastOpens
        self.fastOpenFailures = fastOpenFailures
        self.waiting = waiting
        self.traffic = traffic
    }
}

/// One client's session on the server.
public struct SessionReport: Codable, Sendable, Equatable {
    public var key: String
    /// The comment after the key in the authorized-keys file.
    public var name: String
    public var remote: String
    /// "connected" or "resumable" (its connection broke; kept for the client to resume).
    public var state: String
    public var sessionSeconds: Double
    public var rttMilliseconds: Double?
    public var traffic: TrafficFigures
    public var streams: [StreamReport]?

    public init(key: String, name: String, remote: String, state: String, sessionSeconds: Double) {
        self.key = key
        self.name = name
        self.remote = remote
        self.state = state
        self.sessionSeconds = sessionSeconds
        self.traffic = TrafficFigures()
    }
}

/// `tunnel-server status`.
public struct ServerReport: Codable, Sendable, Equatable {
    public var listen: String
    public var uptimeSeconds: Double
    public var authorizedKeys: Int
    /// Handshakes in progress.
    public var handshaking: Int
    public var sessions: [SessionReport]
    /// Every session since the start, the ended ones included.
    public var totals: TrafficFigures

    public init(listen: String, uptimeSeconds: Double, authorizedKeys: Int, handshaking: Int) {
        self.listen = listen
        self.uptimeSeconds = uptimeSeconds
        self.authorizedKeys = authorizedKeys
        self.handshaking = handshaking
        self.sessions = []
        self.totals = TrafficFigures()
    }
}

/// A time span in seconds, with millisecond precision.
public func seconds(_ amount: TimeAmount) -> Double {
    Double(amount.nanoseconds / 1_000_000) / 1000
}

/// A time span in milliseconds, with microsecond precision.
public func milliseconds(_ amount: TimeAmount?) -> Double? {
    amount.map { Double($0.nanoseconds / 1000) / 1000 }
}
