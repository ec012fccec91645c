import ArgumentParser
import ClientRuntime
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServerRuntime
import ServiceLifecycle
import TunnelConfig
import TunnelRuntime
import UnixSignals

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Runs a root command with the exit codes scripts rely on: 0 on success and for `--help`, 2 for bad
/// arguments and unreadable or malformed files (one line on standard error), 1 for failures at run time.
enum Entry {
    static func main<Root: AsyncParsableCommand>(_ root: Root.Type, name: String) async -> Never {
        signal(SIGPIPE, SIG_IGN)
        raiseOpenFileLimit()
        let arguments = Array(CommandLine.arguments.dropFirst())
        if let first = arguments.first,
            let subcommand = Root.configuration.subcommands.first(where: { $0._commandName == first })
        {
            // A subcommand is parsed on its own: the root's options (its --key) must not take the subcommand's.
            await Self.run(subcommand, of: root, Array(arguments.dropFirst()), name: "\(name) \(first)")
        }
        do {
            var command = try Root.parseAsRoot(arguments)
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
            exit(0)
        } catch let error as ConfigError {
            printError("\(name): \(error.message)")
            exit(2)
        } catch let error as RuntimeFailure {
            printError("\(name): \(error.message)")
            exit(1)
        } catch {
            let code = Root.exitCode(for: error)
            if code == .success {
                print(Root.fullMessage(for: error))
                exit(0)
            }
            let message = Root.message(for: error)
            printError("\(name): \(message.isEmpty ? "\(error)" : message) (see \(name) --help)")
            exit(2)
        }
    }
}

extension Entry {
    static func run<Root: ParsableCommand>(
        _ type: any ParsableCommand.Type,
        of root: Root.Type,
        _ arguments: [String],
        name: String
    ) async -> Never {
        do {
            var command = try type.parseAsRoot(arguments)
            try command.run()
            exit(0)
        } catch let error as ConfigError {
            printError("\(name): \(error.message)")
            exit(2)
        } catch let error as RuntimeFailure {
            printError("\(name): \(error.message)")
            exit(1)
        } catch {
            if type.exitCode(for: error) == .success {
                // The help as the root shows it for this subcommand: usage with the program's name.
                print(Root.helpMessage(for: type))
                exit(0)
            }
            printError("\(name): \(type.message(for: error)) (see \(name) --help)")
            exit(2)
        }
    }
}

/// Every stream holds a socket at each end: raise the soft limit on open files to the hard limit (Debian's
/// default soft limit of 1024 would cap a tunnel at about a thousand streams).
func raiseOpenFileLimit() {
    var limit = rlimit()
    let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
    guard getrlimit(resource, &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
    limit.rlim_cur = min(limit.rlim_max, 1 << 20)
    _ = setrlimit(resource, &limit)
}

/// Writes one line to standard error.
func printError(_ line: String) {
    var bytes = Array((line + "\n").utf8)
    bytes.withUnsafeMutableBytes { _ = write(2, $0.baseAddress!, $0.count) }
}

/// Prints a line to standard output and flushes it at once (tests and scripts wait for readiness lines).
func printFlushed(_ line: String) {
    print(line)
    fflush(nil)
}

/// A failure while running (not a usage error): exit code 1.
struct RuntimeFailure: Error, Sendable {
    var message: String
}

/// The level every logger of the process logs at: one value, so that a reload (SIGHUP) changes it for all of
/// them at once.
enum ProcessLogLevel {
    private static let box = NIOLockedValueBox(Logger.Level.info)
    static var current: Logger.Level {
        get { Self.box.withLockedValue { $0 } }
        set { Self.box.withLockedValue { $0 = newValue } }
    }
}

/// A log handler whose level is the process's (`ProcessLogLevel`): setting a logger's level sets it.
struct ProcessLevelHandler<Inner: LogHandler>: LogHandler {
    var inner: Inner
    var logLevel: Logger.Level {
        get { ProcessLogLevel.current }
        set { ProcessLogLevel.current = newValue }
    }
    var metadata: Logger.Metadata {
        get { self.inner.metadata }
        set { self.inner.metadata = newValue }
    }
    var metadataProvider: Logger.MetadataProvider? {
        get { self.inner.metadataProvider }
        set { self.inner.metadataProvider = newValue }
    }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.inner[metadataKey: key] }
        set { self.inner[metadataKey: key] = newValue }
    }
    func log(event: LogEvent) {
        self.inner.log(event: event)
    }
}

/// Sets up swift-log on standard error at `level`, as text lines or JSON objects (`format`).
func bootstrapLogging(level: String, format: String = "text", label: String) -> Logger {
    let parsed = Logger.Level(rawValue: level) ?? .info
    ProcessLogLevel.current = parsed
    LoggingSystem.bootstrap { label in
        if format == "json" { return ProcessLevelHandler(inner: JSONLogHandler(label: label)) }
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = .trace  // the process's level decides (ProcessLevelHandler)
        return ProcessLevelHandler(inner: handler)
    }
    return Logger(label: label)
}

/// `HOST:PORT` for the readiness line, from the real bound address.
func formatBound(_ address: SocketAddress) -> String {
    let host = address.ipAddress ?? "?"
    let port = address.port ?? 0
    return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
}

/// Parses a `HOST:PORT` flag into an endpoint, or a usage error naming the flag.
func parseEndpointFlag(_ text: String, flag: String) throws(ConfigError) -> Endpoint {
    switch Endpoint.parse(text) {
    case .success(let endpoint): return endpoint
    case .failure(let problem): throw ConfigError("\(flag): \(problem.message)")
    }
}

/// A listener as a ServiceLifecycle service: starts, prints its readiness line with the real bound address,
/// waits for SIGINT/SIGTERM, then stops gracefully.
struct ListenerService: Service {
    let readyPrefix: String
    let failurePrefix: String
    /// The address it binds and the setting that chooses it, for the message when binding fails.
    let listen: String
    let setting: String
    let start: @Sendable () async throws -> SocketAddress
    let stop: @Sendable () async -> Void

    func run() async throws {
        let address: String
        do {
            address = formatBound(try await self.start())
        } catch let failure as any StartupFailure {
            throw RuntimeFailure(message: failure.description)
        } catch {
            throw RuntimeFailure(
                message: "\(self.failurePrefix) on \(self.listen): \(Self.explain(error, setting: self.setting))"
            )
        }
        printFlushed("\(self.readyPrefix) \(address)")
        try? await gracefulShutdown()
        await self.stop()
    }
}

extension ListenerService {
    /// What a bind failure means and what to do about it.
    static func explain(_ error: any Error, setting: String) -> String {
        guard let io = error as? IOError else { return "\(error)" }
        switch io.errnoCode {
        case EADDRINUSE: return "another process is using this address; stop it, or choose another with \(setting)"
        case EADDRNOTAVAIL: return "this host has no such address; choose one of its own with \(setting)"
        case EACCES, EPERM: return "permission denied (ports below 1024 need root); choose another with \(setting)"
        default: return "\(io)"
        }
    }
}

/// Runs `service` until a signal ends it, then shuts `group` down; exit code 1 on a run-time failure.
/// Runs `service` until SIGTERM or SIGINT; `onHangup` runs at each SIGHUP (the program's reload).
func runUntilSignalled(
    _ service: ListenerService,
    group: MultiThreadedEventLoopGroup,
    logger: Logger,
    onHangup: (@Sendable () -> Void)? = nil
) async throws {
    let serviceGroup = ServiceGroup(
        configuration: .init(services: [service], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    )
    let hangups = Task {
        guard let onHangup else { return }
        for await _ in await UnixSignalsSequence(trapping: .sighup) {
            onHangup()
        }
    }
    defer { hangups.cancel() }
    do {
        try await serviceGroup.run()
    } catch {
        try? await group.shutdownGracefully()
        if let failure = error as? RuntimeFailure { throw failure }
        throw RuntimeFailure(message: "\(error)")
    }
    try? await group.shutdownGracefully()
    logger.info("stopped")
}
