import ArgumentParser
import FoundationEssentials
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Prometheus
import ServerRuntime
import TunnelConfig
import TunnelRuntime

/// The control socket of a running program, and the commands that talk to it (README, *Operating it*).
enum Control {
    /// The socket path a setting names: nil for "none" (no socket), the program's default when unset.
    static func path(_ setting: String?, program: String) -> String? {
        guard let setting else { return ControlServer.defaultPath(program: program) }
        if setting.isEmpty || setting == "none" { return nil }
        return setting
    }

    /// Opens the control socket. A socket the user asked for must open; the default one may be taken by
    /// another instance (two clients on one machine): then this one runs without, and says so.
    static func start(
        setting: String?,
        program: String,
        group: any EventLoopGroup,
        logger: Logger,
        respond: @escaping ControlServer.Responder
    ) async throws -> ControlServer? {
        guard let path = self.path(setting, program: program) else { return nil }
        do {
            let server = try await ControlServer.start(path: path, group: group, logger: logger, respond: respond)
            logger.debug("control socket on \(path)")
            return server
        } catch {
            if setting != nil { throw RuntimeFailure(message: "\(error)") }
            logger.notice("\(error): `\(program) status` will not reach this process (set control_socket)")
            return nil
        }
    }

    /// The request line of `status`.
    static func statusRequest(streams: Bool) -> String { streams ? "status streams" : "status" }

    /// Whether a request line asks for a status, and with the streams.
    static func parseStatus(_ line: String) -> (isStatus: Bool, streams: Bool) {
        let words = line.split(separator: " ")
        guard words.first == "status" else { return (false, false) }
        return (true, words.dropFirst().contains("streams"))
    }

    /// The answer to `reload`: the outcome, or the error that left the old keys in place.
    static func reloadAnswer(_ result: Result<TunnelServer.ReloadOutcome, ConfigError>) -> String {
        switch result {
        case .success(let outcome): return self.encode(outcome)
        case .failure(let error): return self.encode(["error": "\(error.message); the keys in use stay"])
        }
    }

    static func encode<T: Encodable>(_ value: T) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let data = try? encoder.encode(value) else { return "{\"error\": \"cannot encode the report\"}" }
        return String(decoding: data, as: UTF8.self)
    }

    static func decode<T: Decodable>(_ type: T.Type, from text: String) throws -> T {
        if let failure = try? JSONDecoder().decode([String: String].self, from: Data(text.utf8)),
            let message = failure["error"]
        {
            throw RuntimeFailure(message: message)
        }
        do {
            return try JSONDecoder().decode(type, from: Data(text.utf8))
        } catch {
            throw RuntimeFailure(message: "the program answered something this command does not understand: \(error)")
        }
    }

    /// Asks the program on the control socket `setting` (or its default) and returns the answer.
    static func ask(_ request: String, setting: String?, program: String) throws -> String {
        guard let path = self.path(setting, program: program) else {
            throw ConfigError("control_socket is none: there is no control socket to ask")
        }
        do {
            return try ControlClient.ask(path, request)
        } catch {
            throw RuntimeFailure(message: error.description)
        }
    }

    /// The control socket setting of a config file, if it names one.
    static func setting(config: String?) throws -> String? {
        guard let config else { return nil }
        var file = try ConfigFile.load(config)
        return try file.string("control_socket")
    }
}

/// A running program's operator side (README, *Operating it*): its control socket, answering `status` (and
/// whatever `handle` takes, such as the server's `reload`), and its metrics endpoint. Both programs run one.
final class Operations: Sendable {
    let program: String
    private let controlSetting: String?
    private let metricsEndpoint: Endpoint?
    private let registry: PrometheusCollectorRegistry?
    private let control = NIOLockedValueBox<ControlServer?>(nil)
    private let metrics = NIOLockedValueBox<(any Channel)?>(nil)

    /// Made before any traffic: the metrics registry is bootstrapped here, and the counters of events bind
    /// to it once.
    init(program: String, controlSocket: String?, metrics: Endpoint?) {
        self.program = program
        self.controlSetting = controlSocket
        self.metricsEndpoint = metrics
        self.registry = metrics.map { _ in TunnelMetrics.bootstrap() }
    }

    /// Opens the control socket and the metrics endpoint. `report` makes a status report (with the streams
    /// or not); `handle` answers requests other than `status` (nil: unknown).
    func start<Report: ScrapedReport>(
        group: any EventLoopGroup,
        logger: Logger,
        report: @escaping @Sendable (_ streams: Bool) -> EventLoopFuture<Report>,
        handle: @escaping @Sendable (String) -> String? = { _ in nil }
    ) async throws {
        let control = try await Control.start(
            setting: self.controlSetting,
            program: self.program,
            group: group,
            logger: logger
        ) { request in
            let (isStatus, streams) = Control.parseStatus(request)
            if isStatus { return report(streams).map { Control.encode($0) } }
            let answer = handle(request) ?? Control.encode(["error": "unknown request '\(request)'"])
            return group.next().makeSucceededFuture(answer)
        }
        self.control.withLockedValue { $0 = control }
        guard let endpoint = self.metricsEndpoint, let registry = self.registry else { return }
        let scrape = MetricsScrape()
        do {
            let channel = try await MetricsEndpoint.start(
                host: endpoint.host,
                port: endpoint.port,
                group: group,
                registry: registry
            ) { report(false).map { $0.apply(to: scrape) } }
            self.metrics.withLockedValue { $0 = channel }
            logger.info("metrics on http://\(endpoint)/metrics")
        } catch {
            throw RuntimeFailure(message: "cannot serve metrics on \(endpoint): \(error)")
        }
    }

    func stop() async {
        self.control.withLockedValue { $0 }?.stop()
        try? await self.metrics.withLockedValue { $0 }?.close()
    }
}

/// Options of the `status` subcommands.
struct StatusOptions: ParsableArguments {
    @Flag(name: .long, help: "Print the report as JSON (one document) instead of a table.")
    var json = false

    @Flag(name: .long, help: "List the open streams too (destination, age, bytes).")
    var streams = false

    @Option(
        name: .long,
        help: ArgumentHelp("The program's config file (for its control_socket).", valueName: "file")
    )
    var config: String?

    @Option(
        name: .customLong("control-socket"),
        help: ArgumentHelp("The program's control socket (default: as the program's own).", valueName: "path")
    )
    var controlSocket: String?

    func ask(program: String) throws -> String {
        let setting = try self.controlSocket ?? Control.setting(config: self.config)
        return try Control.ask(Control.statusRequest(streams: self.streams), setting: setting, program: program)
    }
}

/// `tunnel-client status`.
struct ClientStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the running client's tunnel: state, round-trip time, traffic, streams."
    )

    @OptionGroup var options: StatusOptions

    func run() throws {
        let answer = try self.options.ask(program: "tunnel-client")
        let report = try Control.decode(ClientReport.self, from: answer)
        if self.options.json {
            print(Control.encode(report))
        } else {
            print(StatusTable.client(report), terminator: "")
        }
    }
}

/// `tunnel-server status`.
struct ServerStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the running server's sessions: clients, addresses, traffic, round-trip times."
    )

    @OptionGroup var options: StatusOptions

    func run() throws {
        let answer = try self.options.ask(program: "tunnel-server")
        let report = try Control.decode(ServerReport.self, from: answer)
        if self.options.json {
            print(Control.encode(report))
        } else {
            print(StatusTable.server(report), terminator: "")
        }
    }
}

/// `tunnel-server reload`: the running server re-reads its authorized keys (as on SIGHUP).
struct ServerReload: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload",
        abstract: "Make the running server re-read its authorized keys (as SIGHUP does).",
        discussion: """
            Sessions of keys still listed go on untouched; sessions of removed keys are closed. A file with \
            an error changes nothing: the server keeps the keys in use and this command says why (exit 1).
            """
    )

    @Option(
        name: .long,
        help: ArgumentHelp("The server's config file (for its control_socket).", valueName: "file")
    )
    var config: String?

    @Option(
        name: .customLong("control-socket"),
        help: ArgumentHelp("The server's control socket (default: as the server's own).", valueName: "path")
    )
    var controlSocket: String?

    func run() throws {
        let setting = try self.controlSocket ?? Control.setting(config: self.config)
        let answer = try Control.ask("reload", setting: setting, program: "tunnel-server")
        let outcome = try Control.decode(TunnelServer.ReloadOutcome.self, from: answer)
        print(
            "reloaded: \(outcome.keys) keys (\(outcome.added) added, \(outcome.removed) removed), \(outcome.closedSessions) sessions of removed keys closed"
        )
    }
}

/// The human-readable status (pure: report in, text out).
enum StatusTable {
    static func client(_ r: ClientReport) -> String {
        var out = "tunnel-client: \(r.state) \(r.state == "connected" ? "to" : "for") "
        out += r.state == "connected" ? "\(r.server)" : duration(r.stateSeconds)
        out += r.state == "connected" ? " for \(duration(r.connectionSeconds ?? r.stateSeconds))\n" : " (\(r.server))\n"
        var rows: [(String, String)] = [("server key", r.serverKey)]
        if let session = r.sessionSeconds { rows.append(("session up", duration(session))) }
        if let rtt = r.rttMilliseconds {
            rows.append(("rtt", "\(decimal(rtt)) ms" + (r.minRttMilliseconds.map { " (min \(decimal($0)) ms)" } ?? "")))
        }
        rows.append(("reconnects", "\(r.reconnects) (sessions resumed: \(r.resumes))"))
        rows.append(("streams", "\(r.traffic.streamsOpen) open, \(r.traffic.streamsTotal) in all"))
        if r.waiting > 0 { rows.append(("waiting", "\(r.waiting) requests wait for the tunnel")) }
        rows += self.trafficRows(r.traffic)
        if r.fastOpens > 0 { rows.append(("fast open", "\(r.fastOpens) streams, \(r.fastOpenFailures) failed after")) }
        out += self.rows(rows)
        if let streams = r.streams { out += self.streams(streams) }
        return out
    }

    static func server(_ r: ServerReport) -> String {
        var out = "tunnel-server: listening on \(r.listen), up \(duration(r.uptimeSeconds)), "
        out += "\(r.sessions.count) session\(r.sessions.count == 1 ? "" : "s"), \(r.authorizedKeys) authorized keys"
        out += r.handshaking > 0 ? ", \(r.handshaking) handshakes in progress\n" : "\n"
        if !r.sessions.isEmpty {
            var table = [["CLIENT", "NAME", "REMOTE", "STATE", "SINCE", "STREAMS", "SENT", "RECEIVED", "RTT"]]
            for s in r.sessions {
                table.append([
                    String(s.key.prefix(12)) + "…", s.name.isEmpty ? "-" : s.name, s.remote, s.state,
                    duration(s.sessionSeconds), "\(s.traffic.streamsOpen)/\(s.traffic.streamsTotal)",
                    bytes(s.traffic.payloadSent), bytes(s.traffic.payloadReceived),
                    s.rttMilliseconds.map { "\(decimal($0)) ms" } ?? "-",
                ])
            }
            out += self.columns(table)
        }
        out += "totals since start:\n"
        out += self.rows(
            [("streams", "\(r.totals.streamsOpen) open, \(r.totals.streamsTotal) in all")]
                + self.trafficRows(r.totals)
        )
        for s in r.sessions {
            guard let streams = s.streams else { continue }
            out += "streams of \(s.name.isEmpty ? String(s.key.prefix(12)) : s.name):\n" + self.streams(streams)
        }
        return out
    }

    private static func trafficRows(_ t: TrafficFigures) -> [(String, String)] {
        var rows = [
            (
                "sent",
                "\(bytes(t.payloadSent)) of streams, \(bytes(t.wireSent)) on the wire\(ratio(t.payloadSent, t.wireSent))"
            ),
            (
                "received",
                "\(bytes(t.payloadReceived)) of streams, \(bytes(t.wireReceived)) on the wire\(ratio(t.payloadReceived, t.wireReceived))"
            ),
        ]
        if t.datagramsSent + t.datagramsReceived + t.datagramsDropped > 0 {
            rows.append(
                ("datagrams", "\(t.datagramsSent) sent, \(t.datagramsReceived) received, \(t.datagramsDropped) dropped")
            )
        }
        return rows
    }

    private static func streams(_ streams: [StreamReport]) -> String {
        var table = [["ID", "KIND", "DESTINATION", "AGE", "SENT", "RECEIVED"]]
        for s in streams {
            table.append([
                "\(s.id)", s.kind, s.destination, duration(s.ageSeconds), bytes(s.bytesSent), bytes(s.bytesReceived),
            ])
        }
        return self.columns(table)
    }

    private static func rows(_ rows: [(String, String)]) -> String {
        let width = rows.map(\.0.count).max() ?? 0
        return rows.map { "  " + $0.0.padding(to: width) + "  " + $0.1 + "\n" }.joined()
    }

    private static func columns(_ table: [[String]]) -> String {
        let count = table.map(\.count).max() ?? 0
        var widths = Array(repeating: 0, count: count)
        for row in table { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        return table.map { row in
            "  "
                + row.enumerated().map { i, cell in i == row.count - 1 ? cell : cell.padding(to: widths[i]) }
                .joined(separator: "  ") + "\n"
        }.joined()
    }

    /// "2h 3m", "4m 10s", "12.3s".
    static func duration(_ seconds: Double) -> String {
        let s = Int(seconds)
        if s >= 86400 { return "\(s / 86400)d \(s % 86400 / 3600)h" }
        if s >= 3600 { return "\(s / 3600)h \(s % 3600 / 60)m" }
        if s >= 60 { return "\(s / 60)m \(s % 60)s" }
        return "\(decimal(seconds))s"
    }

    /// "512 B", "1.5 KiB", "12.3 MiB", "2.0 GiB".
    static func bytes(_ count: Int) -> String {
        if count < 1024 { return "\(count) B" }
        let units = ["KiB", "MiB", "GiB", "TiB"]
        var value = Double(count) / 1024
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return "\(decimal(value)) \(units[unit])"
    }

    /// One decimal.
    static func decimal(_ value: Double) -> String {
        let tenths = Int((value * 10).rounded())
        return "\(tenths / 10).\(abs(tenths % 10))"
    }

    /// ", ratio 2.5:1" when compression shrank the traffic noticeably.
    private static func ratio(_ payload: Int, _ wire: Int) -> String {
        guard wire > 0, payload > wire + wire / 10 else { return "" }
        return " (compressed \(decimal(Double(payload) / Double(wire))):1)"
    }
}

extension String {
    fileprivate func padding(to width: Int) -> String {
        self.count >= width ? self : self + String(repeating: " ", count: width - self.count)
    }
}
