import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import TunnelProtocol

/// Prometheus metrics (README, *Operating it*): swift-metrics with swift-prometheus as its backend, served as
/// text at `GET /metrics` on `--metrics HOST:PORT` (off unless asked).
///
/// Nothing on the data path touches them. Events that are rare (a handshake, a stream's open result, an RTT
/// sample: at most ten a second per tunnel) are counted as they happen; traffic figures are plain integers in
/// the sessions, read at each scrape (`MetricsScrape`) and turned into counter increments and gauge values.
/// No label names a destination or a client (privacy, and cardinality).
public enum TunnelMetrics {
    /// Makes swift-metrics record into a Prometheus registry (once, at start, before any traffic).
    public static func bootstrap() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        let rttBuckets: [Duration] = [
            .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(20), .milliseconds(50), .milliseconds(100), .milliseconds(200), .milliseconds(500),
            .seconds(1), .seconds(2), .seconds(5),
        ]
        factory.durationHistogramBuckets = [
            "tunnel_rtt_seconds": rttBuckets, "tunnel_handshake_duration_seconds": rttBuckets,
        ]
        MetricsSystem.bootstrap(factory)
        Self.prepare()
        return registry
    }

    /// Creates the counters of events, so that a scrape shows them at 0 before the first event.
    public static func prepare() {
        _ = Self.handshakes
        _ = Self.opens
        _ = Self.otherOpens
        Self.resumes.increment(by: 0)
    }

    /// How a handshake ended.
    public enum HandshakeOutcome: String, Sendable, CaseIterable {
        case ok
        /// The server does not know the client's key (or the client was refused by the server).
        case unknownKey = "unknown_key"
        case replay
        case timeout
        /// Anything else: bad messages, failed authentication, a connection that ended half way.
        case malformed
    }

    private static let handshakes: [HandshakeOutcome: Metrics.Counter] = Dictionary(
        uniqueKeysWithValues: HandshakeOutcome.allCases.map {
            ($0, Metrics.Counter(label: "tunnel_handshakes_total", dimensions: [("outcome", $0.rawValue)]))
        }
    )
    private static let opens: [Metrics.Counter] = (0...9).map { code in
        Metrics.Counter(label: "tunnel_stream_opens_total", dimensions: [("reply", Self.replyName(UInt8(code)))])
    }
    private static let otherOpens = Metrics.Counter(
        label: "tunnel_stream_opens_total",
        dimensions: [("reply", "other")]
    )
    private static let resumes = Metrics.Counter(label: "tunnel_resumes_total")
    private static let roundTrips = Metrics.Timer(label: "tunnel_rtt_seconds")
    private static let handshakeDurations = Metrics.Timer(label: "tunnel_handshake_duration_seconds")

    public static func handshake(_ outcome: HandshakeOutcome) {
        Self.handshakes[outcome]?.increment()
    }

    /// A handshake took `duration` (from the connection's start to the established session).
    public static func handshakeTook(_ duration: TimeAmount) {
        Self.handshakeDurations.recordNanoseconds(duration.nanoseconds)
    }

    /// A stream's open was answered with `reply` (server: its connect's outcome; client: what it was told).
    public static func streamOpened(_ reply: ReplyCode) {
        let code = Int(reply.rawValue)
        if code < Self.opens.count { Self.opens[code].increment() } else { Self.otherOpens.increment() }
    }

    /// A session was resumed over a new connection (server side; the client's count is in its report).
    public static func resumed() {
        Self.resumes.increment()
    }

    /// A round-trip sample of the tunnel (client: PING; at most ten a second).
    public static func roundTrip(_ sample: TimeAmount) {
        Self.roundTrips.recordNanoseconds(sample.nanoseconds)
    }

    /// The label value of a SOCKS5 reply code.
    static func replyName(_ code: UInt8) -> String {
        switch code {
        case 0: "succeeded"
        case 1: "general_failure"
        case 2: "not_allowed"
        case 3: "network_unreachable"
        case 4: "host_unreachable"
        case 5: "connection_refused"
        case 6: "ttl_expired"
        case 7: "command_not_supported"
        case 8: "address_type_not_supported"
        default: "other"
        }
    }
}

/// A status report whose figures a scrape turns into metric values.
public protocol ScrapedReport: Encodable, Sendable {
    func apply(to scrape: MetricsScrape)
}

extension ClientReport: ScrapedReport {
    public func apply(to scrape: MetricsScrape) { scrape.apply(self) }
}

extension ServerReport: ScrapedReport {
    public func apply(to scrape: MetricsScrape) { scrape.apply(self) }
}

/// Turns the figures of a status report into metric values at each scrape: totals into counter increments
/// (by what they grew since the last scrape), the rest into gauges.
public final class MetricsScrape: Sendable {
    private let last = NIOLockedValueBox<[String: Int]>([:])

    public init() {}

    /// Advances the counter `label` (with `dimensions`) to `total`.
    func advance(_ label: String, _ dimensions: [(String, String)] = [], to total: Int) {
        let key = label + dimensions.map { "|\($0.0)=\($0.1)" }.joined()
        let delta = self.last.withLockedValue { last -> Int? in
            guard let previous = last[key] else {
                // The first scrape creates the series, at 0 if nothing happened yet.
                last[key] = max(0, total)
                return max(0, total)
            }
            guard total > previous else { return nil }
            last[key] = total
            return total - previous
        }
        if let delta { Metrics.Counter(label: label, dimensions: dimensions).increment(by: delta) }
    }

    func gauge(_ label: String, _ value: Double) {
        self.gauge(label, [], value)
    }

    func gauge(_ label: String, _ dimensions: [(String, String)], _ value: Double) {
        Metrics.Gauge(label: label, dimensions: dimensions).record(value)
    }

    private func traffic(_ t: TrafficFigures) {
        self.advance("tunnel_payload_bytes_total", [("direction", "sent")], to: t.payloadSent)
        self.advance("tunnel_payload_bytes_total", [("direction", "received")], to: t.payloadReceived)
        self.advance("tunnel_wire_bytes_total", [("direction", "sent")], to: t.wireSent)
        self.advance("tunnel_wire_bytes_total", [("direction", "received")], to: t.wireReceived)
        self.advance("tunnel_streams_opened_total", to: t.streamsTotal)
        self.gauge("tunnel_streams_open", Double(t.streamsOpen))
        self.advance("tunnel_datagrams_total", [("event", "sent")], to: t.datagramsSent)
        self.advance("tunnel_datagrams_total", [("event", "received")], to: t.datagramsReceived)
        self.advance("tunnel_datagrams_total", [("event", "dropped")], to: t.datagramsDropped)
    }

    public func apply(_ r: ClientReport) {
        self.traffic(r.traffic)
        self.gauge("tunnel_connected", r.state == "connected" ? 1 : 0)
        self.advance("tunnel_reconnects_total", to: r.reconnects)
        self.advance("tunnel_resumes_total", to: r.resumes)
        self.advance("tunnel_fast_opens_total", to: r.fastOpens)
        self.advance("tunnel_fast_open_failures_total", to: r.fastOpenFailures)
        self.gauge("tunnel_waiting_requests", Double(r.waiting))
        if let rtt = r.rttMilliseconds { self.gauge("tunnel_smoothed_rtt_seconds", rtt / 1000) }
    }

    public func apply(_ r: ServerReport) {
        self.traffic(r.totals)
        self.gauge("tunnel_sessions", [("state", "connected")], Double(r.sessions.count { $0.state == "connected" }))
        self.gauge("tunnel_sessions", [("state", "resumable")], Double(r.sessions.count { $0.state == "resumable" }))
        self.gauge("tunnel_authorized_keys", Double(r.authorizedKeys))
        self.gauge("tunnel_handshakes_in_progress", Double(r.handshaking))
        self.gauge("tunnel_uptime_seconds", r.uptimeSeconds)
    }
}

/// The HTTP endpoint Prometheus scrapes: `GET /metrics` runs `collect` (which brings the registry up to
/// date), then answers with the registry in the text format; anything else gets 404.
public enum MetricsEndpoint {
    public static func start(
        host: String,
        port: Int,
        group: any EventLoopGroup,
        registry: PrometheusCollectorRegistry,
        collect: @escaping @Sendable () -> EventLoopFuture<Void>
    ) async throws -> any Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(
                        MetricsHTTPHandler(registry: registry, collect: collect)
                    )
                }
            }
            .bind(host: host, port: port)
            .get()
    }
}

private final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let registry: PrometheusCollectorRegistry
    private let collect: @Sendable () -> EventLoopFuture<Void>
    private var head: HTTPRequestHead?

    init(registry: PrometheusCollectorRegistry, collect: @escaping @Sendable () -> EventLoopFuture<Void>) {
        self.registry = registry
        self.collect = collect
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head): self.head = head
        case .body: break
        case .end:
            guard let head = self.head else { return }
            self.head = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            guard path == "/metrics", head.method == .GET || head.method == .HEAD else {
                self.respond(context: context, head: head, status: .notFound, body: "try /metrics\n")
                return
            }
            let registry = self.registry
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            self.collect().hop(to: context.eventLoop).whenComplete { _ in
                let (handler, context) = bound.value
                handler.respond(
                    context: context,
                    head: head,
                    status: .ok,
                    body: registry.emitToString(),
                    contentType: "text/plain; version=0.0.4; charset=utf-8"
                )
            }
        }
    }

    private func respond(
        context: ChannelHandlerContext,
        head: HTTPRequestHead,
        status: HTTPResponseStatus,
        body: String,
        contentType: String = "text/plain; charset=utf-8"
    ) {
        var buffer = context.channel.allocator.buffer(capacity: body.utf8.count)
        buffer.writeString(body)
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(buffer.readableBytes)")
        let keepAlive = head.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(
            self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))),
            promise: nil
        )
        if head.method != .HEAD { context.write(self.wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil) }
        context.writeAndFlush(self.wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            if !keepAlive { context.close(promise: nil) }
        }
    }
}
