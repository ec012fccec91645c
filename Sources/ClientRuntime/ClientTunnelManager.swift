import LocalProxy
import Logging
import NIOCore
import NIOPosix
import TunnelConfig
import TunnelCrypto
import TunnelEventLoop
import TunnelProtocol
import TunnelRuntime
import TunnelTransport

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Keeps the client's one tunnel up and routes SOCKS requests into it.
///
/// Everything runs on one event loop, shared with every SOCKS connection, so streams and the tunnel never
/// cross threads. While the tunnel is down, requests wait (bounded in number and time) and the manager
/// reconnects with exponential backoff and jitter; a request arriving during a long backoff triggers an early
/// attempt. Streams in flight when the tunnel is lost are reset, never cleanly closed.
final class ClientTunnelManager: TunnelStreamProvider, TunnelConnectionDelegate {
    private let eventLoop: any EventLoop
    private let resolved: ClientSettings.Resolved
    private var configuration: TunnelConnectionHandler.Configuration
    private var logger: Logger

    /// The tunnel new streams go to, once established.
    private var current: TunnelConnectionHandler?
    /// Every live tunnel connection (the current one, and older ones draining after a GOAWAY).
    private var live: [ObjectIdentifier: TunnelConnectionHandler] = [:]
    private var connecting = false
    private var stopped = false
    /// Backoff, early attempts for waiting users, and the memory of replacements.
    private var reconnect: ReconnectPolicy
    /// Which server of the list the next attempt goes to.
    private var rotation: ServerRotation
    /// The server of the current attempt or tunnel.
    private var target: ClientSettings.Resolved.Server { self.resolved.servers[self.rotation.current] }
    private var reconnectTask: Scheduled<Void>?
    /// The AEAD of the next attempt (alternates under `auto` until one works).
    private var nextCipher: NoiseCipher
    private var workingCipher: NoiseCipher?

    private struct Waiter {
        let target: TargetAddress
        let kind: StreamKind
        let local: any StreamEndpoint
    }
    /// SOCKS requests waiting for a tunnel (bounded in number and time).
    private var waiting: WaitingQueue<Waiter>
    /// Destinations the server reached lately: opened with early data under `fast_open = auto`.
    private var fastOpenCache = FastOpenCache()
    /// Streams opened with early data, and how many of those the server then failed to connect.
    private var fastOpens = 0
    private var fastOpenFailures = 0
    private var waiterTimer: Scheduled<Void>?
    /// A session whose connection broke, kept for the next connection to resume (docs/PROTOCOL.md §7), since
    /// when, and the end of its grace period.
    private var detached: TunnelConnectionHandler?
    private var detachedAt = NIODeadline.distantPast
    private var graceTimer: Scheduled<Void>?
    /// Sessions resumed over a new connection so far.
    private(set) var resumes = 0
    /// When the current (or last) connection attempt began: metrics' connect and handshake time, and the
    /// spacing between two handshakes.
    private var attemptStarted = NIODeadline.distantPast
    /// Tunnels established so far (each new session; resumes not counted).
    private var establishments = 0
    /// What the sessions that ended carried (status totals).
    private var endedTraffic = TrafficFigures()
    /// The state the last status report showed, and since when the client is in it.
    private var reportedState = "connecting"
    private var stateSince = NIODeadline.now()

    /// Fast open (README, *Fast open*); a reload may change it.
    var fastOpenMode: ClientSettings.FastOpen

    /// Full-tunnel mode: the device and host changes, fed with assignments and packets.
    var fullTunnel: ClientFullTunnel? {
        didSet {
            self.configuration.session.fullTunnel = self.fullTunnel != nil
            // Not in full-tunnel mode: there the apps' own TCP connections survive a break (the device stays,
            // the server holds the lease), and the session starts anew.
            if self.fullTunnel != nil { self.configuration.session.resumption = false }
            self.configuration.session.packetOffload = self.fullTunnel?.offersOffload ?? false
            // An app's packet while the tunnel is down is a user waiting, like a SOCKS request.
            self.fullTunnel?.onPacketWhileDown = { [weak self] in self?.someoneIsWaiting() }
        }
    }
    /// Connect to this address instead of resolving the server's name each time (full-tunnel mode pins it:
    /// its routes are for that address).
    var connectHost: String?
    /// Called once, when the first attempt has established the tunnel or failed.
    var onFirstAttempt: (() -> Void)?
    /// Called once when the client cannot go on (the server refuses full-tunnel mode, the host cannot be
    /// configured).
    var onFatal: ((String) -> Void)?

    init(eventLoop: any EventLoop, resolved: ClientSettings.Resolved, logger: Logger) {
        self.eventLoop = eventLoop
        self.resolved = resolved
        var configuration = TunnelConnectionHandler.Configuration(resolved.settings.timings)
        configuration.session.compression = resolved.settings.compress
        // Offered whatever the mode: `fast_open` decides whether a stream uses it, and a reload may change that
        // while the tunnel is up.
        configuration.session.earlyData = true
        self.fastOpenMode = resolved.settings.fastOpen
        self.configuration = configuration
        self.logger = logger
        self.reconnect = ReconnectPolicy(maximum: .nanoseconds(resolved.settings.reconnectMax))
        self.rotation = ServerRotation(count: resolved.servers.count)
        self.waiting = WaitingQueue(capacity: resolved.settings.maxWaitingRequests)
        switch resolved.settings.cipher {
        case .fixed(let cipher): self.nextCipher = cipher
        case .automatic: self.nextCipher = NoiseCipher.aesGCM.isAvailable ? .aesGCM : .chaChaPoly
        }
    }

    // MARK: - Connecting

    func start() {
        self.connect()
    }

    private func connect() {
        guard !self.stopped, !self.connecting else { return }
        self.reconnectTask?.cancel()
        self.reconnectTask = nil
        // A server takes one handshake of a key per flood spacing (ReplayTable) and refuses a closer one: an
        // attempt right after the last (a new session after a refused resume, the next server of a pool
        // behind one balancer) waits out the spacing rather than be refused and back off.
        let ready = self.attemptStarted + Self.handshakeSpacing
        if ready > .now() {
            self.reconnectTask = self.eventLoop.assumeIsolated().scheduleTask(deadline: ready) { self.connect() }
            return
        }
        self.connecting = true
        self.attemptStarted = .now()
        self.reconnect.attempting(now: self.attemptStarted)
        let cipher = self.nextCipher
        let machine = ClientHandshakeStateMachine(
            cipher: cipher,
            staticKey: self.resolved.key,
            serverKey: self.target.key,
            parameters: Multiplexer.announcedParameters(
                for: self.configuration.session.multiplexer,
                features: self.configuration.session.features
            )
        )
        let handler: TunnelConnectionHandler
        if let detached = self.detached {
            // The new connection carries the kept session on: same handler, same streams.
            detached.core.reconnect(machine, now: .now())
            handler = detached
        } else {
            handler = TunnelConnectionHandler(
                role: .client(machine),
                configuration: self.configuration,
                logger: self.logger
            )
            handler.delegate = self
            handler.roundTripObserver = { TunnelMetrics.roundTrip($0) }
        }
        let boundHandler = NIOLoopBound(handler, eventLoop: self.eventLoop)
        let server = self.target.endpoint
        let timings = self.resolved.settings.timings
        let logger = self.logger
        self.logger.debug("connecting to \(server) (\(cipher))")
        let host = self.connectHost ?? server.host
        let timeout = self.configuration.session.timers.handshakeTimeout
        // Our own socket, raced over the server's addresses (Happy Eyeballs), handed to NIO connected: the
        // handler knows its descriptor for direct writes without searching for it.
        NIOThreadPool.singleton.runIfActive(eventLoop: self.eventLoop) {
            Dialer.connect(host: host, port: UInt16(server.port), timeout: timeout)
        }
        .assumeIsolated()
        .whenComplete { result in
            let connection: Dialer.Connection
            switch result {
            case .success(.success(let connected)):
                connection = connected
            case .success(.failure(let failure)):
                self.connecting = false
                self.attemptFailed("cannot connect to \(server): \(failure)", handshake: false)
                return
            case .failure(let error):
                self.connecting = false
                self.attemptFailed("cannot connect to \(server): \(error)", handshake: false)
                return
            }
            guard !self.stopped, handler.core.phase != .closed else {
                // Stopping, or the kept session was given up while this connection was being made.
                close(connection.descriptor)
                self.connecting = false
                if !self.stopped && !self.waiting.isEmpty { self.connect() }
                return
            }
            handler.socketDescriptor = connection.descriptor
            if let loop = self.eventLoop as? EpollEventLoop {
                let channel = EpollStreamChannel(descriptor: connection.descriptor, loop: loop)
                do {
                    try TunnelSocket.configure(channel, timings: timings, logger: logger)
                    try channel.pipeline.syncOperations.addHandler(handler)
                } catch {
                    channel.close(promise: nil)
                    self.connecting = false
                    self.attemptFailed("cannot use the connection to \(server): \(error)", handshake: false)
                    return
                }
                if let error = channel.activate() {
                    self.connecting = false
                    self.attemptFailed("cannot use the connection to \(server): \(error)", handshake: false)
                    return
                }
                self.live[ObjectIdentifier(handler)] = handler
                return
            }
            ClientBootstrap(group: self.eventLoop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try TunnelSocket.configure(channel, timings: timings, logger: logger)
                        try channel.pipeline.syncOperations.addHandler(boundHandler.value)
                    }
                }
                .withConnectedSocket(connection.descriptor)
                .assumeIsolated()
                .whenComplete { result in
                    switch result {
                    case .success:
                        self.live[ObjectIdentifier(handler)] = handler
                    case .failure(let error):
                        self.connecting = false
                        self.attemptFailed("cannot use the connection to \(server): \(error)", handshake: false)
                    }
                }
        }
    }

    private func attemptFailed(_ why: String, handshake: Bool) {
        if handshake, case .automatic = self.resolved.settings.cipher, self.workingCipher == nil,
            NoiseCipher.aesGCM.isAvailable
        {
            // The server may not take AES-GCM (no AES-NI there): alternate until one cipher works.
            self.nextCipher = self.nextCipher == .aesGCM ? .chaChaPoly : .aesGCM
        }
        guard !self.stopped else {
            self.firstAttemptDone()
            return
        }
        let failed = self.target.endpoint
        if self.rotation.failed() {
            // Another server of the list is still untried in this round: at once, no backoff.
            self.logger.info("\(why); trying \(self.target.endpoint) (after \(failed))")
            self.connect()
            return
        }
        // Every server failed: the SOCKS port opens (requests wait for the tunnel), and the next round backs off.
        self.firstAttemptDone()
        let delay = self.reconnect.failed(jitter: Double(secureRandomUniform(1000)) / 2000 + 0.5)
        let level: Logger.Level = self.reconnect.failureIsWorthAWarning ? .warning : .info
        self.logger.log(level: level, "\(why); retrying in \(Self.format(delay))")
        self.reconnectTask = self.eventLoop.assumeIsolated().scheduleTask(in: delay) { self.connect() }
    }

    private func firstAttemptDone() {
        guard let report = self.onFirstAttempt else { return }
        self.onFirstAttempt = nil
        report()
    }

    /// A little more than the server's smallest spacing between two handshakes of one key.
    static let handshakeSpacing = ReplayTable().minimumSpacing + .milliseconds(5)

    private static func format(_ t: TimeAmount) -> String {
        let ms = t.nanoseconds / 1_000_000
        return ms < 1000 ? "\(ms) ms" : "\(Double(ms / 100) / 10) s"
    }

    // MARK: - TunnelConnectionDelegate

    func tunnelEstablished(_ tunnel: TunnelConnectionHandler, session: EstablishedSession) {
        self.connecting = false
        defer { self.firstAttemptDone() }
        self.current = tunnel
        self.workingCipher = session.cipher
        self.nextCipher = session.cipher
        self.reconnect.succeeded(now: .now())
        TunnelMetrics.handshake(.ok)
        TunnelMetrics.handshakeTook(.now() - self.attemptStarted)
        if tunnel !== self.detached { self.establishments += 1 }
        self.stateChanged()
        let compression: String
        if self.configuration.session.compression {
            compression = tunnel.compressionActive ? ", compression on" : ", compression refused by the server"
        } else {
            compression = ""
        }
        self.rotation.succeeded()
        self.logger.info("tunnel up to \(self.target.endpoint) (\(session.cipher)\(compression))")
        // Records skip NIO's write path: the client has few descriptors to scan, once per connection.
        if !tunnel.enableDirectWrites() {
            self.logger.debug("tunnel socket descriptor not found; writing through the channel")
        }
        if self.fullTunnel != nil && !tunnel.fullTunnelActive {
            self.fatal("the server does not offer full-tunnel mode (start tunnel-server with --tun)")
            return
        }
        self.serveWaiting()
    }

    func tunnel(_ tunnel: TunnelConnectionHandler, receivedControl payload: ByteBuffer) throws(ProtocolError) {
        guard let fullTunnel = self.fullTunnel, tunnel.fullTunnelActive else { return }
        let assignment = try TunnelAssignment.decode(payload)
        do {
            try fullTunnel.assigned(assignment, on: tunnel)
        } catch {
            self.fatal(error.description)
        }
    }

    func tunnel(_ tunnel: TunnelConnectionHandler, receivedIPPacket packet: ByteBuffer) {
        self.fullTunnel?.packetFromTunnel(packet)
    }

    func tunnelReadFinished(_ tunnel: TunnelConnectionHandler) {
        self.fullTunnel?.tunnelReadFinished()
    }

    private func fatal(_ message: String) {
        guard let report = self.onFatal else { return }
        self.onFatal = nil
        self.stopped = true
        self.logger.critical("\(message)")
        report(message)
    }

    func tunnelPeerGoingAway(_ tunnel: TunnelConnectionHandler) {
        guard self.current === tunnel else { return }
        // The server is going away: its open streams finish on this connection, new ones need a new one (on the
        // next server of the list, if there is one: this one is draining).
        self.current = nil
        if self.resolved.servers.count > 1 {
            self.rotation.moveOn()
            self.logger.info("moving to \(self.target.endpoint)")
        }
        self.connect()
    }

    func tunnelStreamReleased(_ tunnel: TunnelConnectionHandler) {
        if !self.waiting.isEmpty && tunnel === self.current { self.serveWaiting() }
    }

    func tunnelDetached(_ tunnel: TunnelConnectionHandler, error: ProtocolError) {
        self.connecting = false
        if self.current === tunnel { self.current = nil }
        defer { self.stateChanged() }
        guard !self.stopped else {
            tunnel.abandon(code: .shutdown, why: "stopping")
            return
        }
        if self.detached === tunnel {
            // A reconnect failed (the path is still down, or the server is restarting): try again later.
            self.attemptFailed("cannot resume the session yet: \(error.detail)", handshake: false)
            return
        }
        self.detached = tunnel
        self.detachedAt = .now()
        let grace = TimeAmount.nanoseconds(self.resolved.settings.timings.resumeGrace)
        self.logger.warning(
            "tunnel lost: \(error.detail); resuming the session (\(tunnel.multiplexer?.streamCount ?? 0) streams wait, up to \(Self.format(grace)))"
        )
        self.graceTimer = self.eventLoop.assumeIsolated().scheduleTask(in: grace) { self.graceExpired() }
        self.connect()
    }

    private func graceExpired() {
        guard let tunnel = self.detached else { return }
        self.detached = nil
        self.graceTimer = nil
        let streams = tunnel.multiplexer?.streamCount ?? 0
        let grace = TimeAmount.nanoseconds(self.resolved.settings.timings.resumeGrace)
        self.logger.warning("could not resume the session within \(Self.format(grace)): \(streams) streams reset")
        tunnel.abandon(code: .timeout, why: "not resumed within the grace period")
    }

    func tunnelResumed(_ tunnel: TunnelConnectionHandler, replayed: Int) {
        self.connecting = false
        self.detached = nil
        defer { self.stateChanged() }
        self.graceTimer?.cancel()
        self.graceTimer = nil
        self.current = tunnel
        self.resumes += 1
        self.reconnect.succeeded(now: .now())
        let outage = (NIODeadline.now() - self.detachedAt).nanoseconds / 1_000_000
        self.logger.info(
            "session resumed after \(outage) ms: \(tunnel.multiplexer?.streamCount ?? 0) streams kept, \(replayed) records (\(tunnel.core.lastReplayBytes) bytes) sent again"
        )
        _ = tunnel.enableDirectWrites()
        self.serveWaiting()
    }

    func tunnelClosed(_ tunnel: TunnelConnectionHandler, error: ProtocolError?) {
        self.live.removeValue(forKey: ObjectIdentifier(tunnel))
        self.endedTraffic.add(TrafficFigures(tunnel).ended)
        defer { self.stateChanged() }
        if self.detached === tunnel {
            // The server could not resume the session (it restarted, or the session expired there): its
            // streams were reset; a fresh session takes new requests.
            self.detached = nil
            self.graceTimer?.cancel()
            self.graceTimer = nil
            self.connecting = false
            self.logger.warning("\(error?.detail ?? "the session could not be resumed"); starting a new session")
            self.connect()
            return
        }
        if self.fullTunnel != nil, tunnel.fullTunnelActive {
            let (full, delayed, refused) = (tunnel.droppedPackets, tunnel.delayedPacketDrops, tunnel.refusedPackets)
            if full > 0 || delayed > 0 || refused > 0 {
                self.logger.info(
                    "full tunnel: packets dropped on this connection: \(full) over the send queue limit, \(delayed) for waiting too long in it, \(refused) from the server with an offload header refused"
                )
            }
        }
        self.fullTunnel?.tunnelLost(tunnel)
        let wasCurrent = self.current === tunnel
        if wasCurrent { self.current = nil }
        if tunnel.session == nil {
            self.connecting = false
            TunnelMetrics.handshake(
                error?.code == .handshakeRejected
                    ? .unknownKey : error?.detail == "handshake timed out" ? .timeout : .malformed
            )
            var why = error?.detail ?? "handshake failed"
            if error?.code == .handshakeRejected {
                why =
                    "the server refused the handshake: check --server-key, "
                    + "that this client's key (\(self.resolved.key.publicKey)) is in the server's authorized keys, "
                    + "and that no other machine uses this key (the server's log says so)"
            }
            self.attemptFailed(why, handshake: true)
            return
        }
        guard wasCurrent, !self.stopped else { return }
        if tunnel.peerCloseCode == .replaced {
            // Another connection with this client's key took over: this very client did not make it (its
            // own reconnects abandon the old tunnel first), so another machine holds the same key. Back off
            // rather than take the session back at once, which would only replace the other one in turn.
            let replacements = self.reconnect.replaced(now: .now())
            let why =
                replacements >= 3
                ? "the server replaced this tunnel \(replacements) times in a minute: this client's key (\(self.resolved.key.publicKey)) "
                    + "is in use on another machine too. Give each machine its own key (tunnel-client keygen) and list each in the server's authorized keys"
                : "the server replaced this tunnel with a newer connection using this client's key; if this repeats, another machine uses the same key"
            self.attemptFailed(why, handshake: false)
            return
        }
        self.logger.warning("tunnel lost: \(error?.detail ?? "closed by the server"); reconnecting")
        self.connect()
    }

    // MARK: - TunnelStreamProvider

    func requestStream(to target: TargetAddress, kind: StreamKind, local: any StreamEndpoint) {
        if let tunnel = self.current, tunnel.canOpenStream, self.waiting.isEmpty,
            self.open(target, kind: kind, local: local, on: tunnel)
        {
            return
        }
        if let tunnel = self.current, tunnel.streamIDsExhausted {
            // About two billion streams on one connection: a fresh tunnel takes the new ones, this one drains.
            self.logger.info("stream ids of this tunnel are used up; opening a new tunnel")
            tunnel.shutdown(drainTimeout: .nanoseconds(self.resolved.settings.timings.drainTimeout)) {}
            self.current = nil
            self.connect()
        }
        let deadline = NIODeadline.now() + .nanoseconds(self.resolved.settings.connectWait)
        guard !self.stopped, self.waiting.append(Waiter(target: target, kind: kind, local: local), deadline: deadline)
        else {
            local.openCompleted(reply: .generalFailure, bound: .unspecified)
            return
        }
        self.armWaiterTimer()
        self.someoneIsWaiting()
    }

    /// A user is waiting for the tunnel (a request, a packet): do not sit out a long backoff; try now, at
    /// most once a second.
    private func someoneIsWaiting() {
        if self.current == nil && !self.connecting && !self.stopped
            && self.reconnect.shouldTryForWaitingUser(now: .now())
        {
            self.connect()
        }
    }

    func cancelStreamRequest(_ local: any StreamEndpoint) {
        if self.waiting.remove(where: { $0.local === local }) { return }
        local.cancelPendingOpen()
    }

    private func serveWaiting() {
        while let tunnel = self.current, tunnel.canOpenStream, let entry = self.waiting.popFirstEntry() {
            let waiter = entry.item
            if !self.open(waiter.target, kind: waiter.kind, local: waiter.local, on: tunnel) {
                self.waiting.putBack(waiter, deadline: entry.deadline)
                break
            }
        }
    }

    private func armWaiterTimer() {
        guard self.waiterTimer == nil, let deadline = self.waiting.nextDeadline else { return }
        self.waiterTimer = self.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.waiterTimer = nil
            for waiter in self.waiting.expired(now: .now()) {
                waiter.local.openCompleted(reply: .generalFailure, bound: .unspecified)
            }
            self.armWaiterTimer()
        }
    }

    // MARK: - Status (README, *Operating it*)

    /// What `tunnel-client status` shows; `streams` lists the open streams too.
    func report(streams: Bool) -> ClientReport {
        let now = NIODeadline.now()
        let tunnel = self.current ?? self.detached
        self.stateChanged()
        let state = self.reportedState
        var traffic = self.endedTraffic
        // A session's figures count once, whichever of its connections carried them.
        var counted = Set<ObjectIdentifier>()
        for live in [tunnel].compactMap({ $0 }) + Array(self.live.values)
        where counted.insert(ObjectIdentifier(live)).inserted {
            traffic.add(TrafficFigures(live))
        }
        var report = ClientReport(
            server: "\(self.target.endpoint)",
            serverKey: self.target.key.base64,
            state: state,
            stateSeconds: seconds(now - self.stateSince),
            reconnects: max(0, self.establishments - 1),
            resumes: self.resumes,
            fastOpens: self.fastOpens,
            fastOpenFailures: self.fastOpenFailures,
            waiting: self.waiting.count,
            traffic: traffic
        )
        if let tunnel {
            report.sessionSeconds = tunnel.establishedAt.map { seconds(now - $0) }
            report.connectionSeconds = tunnel.connectedAt.map { seconds(now - $0) }
            report.rttMilliseconds = milliseconds(tunnel.multiplexer?.smoothedRoundTrip)
            report.minRttMilliseconds = milliseconds(tunnel.multiplexer?.minimumRoundTrip)
            if streams { report.streams = StreamReport.list(tunnel, now: now) }
        }
        return report
    }

    /// Notes when the state status shows changed.
    private func stateChanged() {
        let state: String
        if self.stopped {
            state = "stopping"
        } else if self.current != nil {
            state = "connected"
        } else if self.detached != nil {
            state = "resuming"
        } else {
            state = "connecting"
        }
        guard state != self.reportedState else { return }
        self.reportedState = state
        self.stateSince = .now()
    }

    /// Opens a stream on `tunnel`, with early data when fast open says so (README, *Fast open*).
    private func open(
        _ target: TargetAddress,
        kind: StreamKind,
        local: any StreamEndpoint,
        on tunnel: TunnelConnectionHandler
    ) -> Bool {
        let early: Bool
        let possible = kind == .tcp && tunnel.earlyDataActive && local.takesEarlyAnswer
        switch self.fastOpenMode {
        case .never: early = false
        case .always: early = possible
        case .auto: early = possible && self.fastOpenCache.contains(target, now: .now())
        }
        guard tunnel.openStream(to: target, kind: kind, local: local, early: early) else { return false }
        if early { self.fastOpens += 1 }
        return true
    }

    func tunnel(_ tunnel: TunnelConnectionHandler, opened target: TargetAddress, reply: ReplyCode, answeredEarly: Bool)
    {
        TunnelMetrics.streamOpened(reply)
        if reply == .succeeded {
            self.fastOpenCache.succeeded(target, now: .now())
        } else {
            // The next attempt waits for the server's answer, and gets the exact reply code.
            self.fastOpenCache.failed(target)
            if answeredEarly {
                self.fastOpenFailures += 1
                self.logger.debug("fast open of \(target) failed after the application was answered: \(reply)")
            }
        }
    }

    // MARK: - Shutdown

    /// Stops reconnecting, fails waiting requests, and shuts every tunnel down gracefully.
    func shutdown(drainTimeout: TimeAmount) -> EventLoopFuture<Void> {
        if self.fastOpens > 0 {
            self.logger.info(
                "fast open: \(self.fastOpens) streams opened before the server's answer, \(self.fastOpenFailures) of them failed after (reset)"
            )
        }
        if self.resumes > 0 {
            self.logger.info("session resumed over a new connection \(self.resumes) times")
        }
        self.stopped = true
        self.reconnectTask?.cancel()
        self.graceTimer?.cancel()
        if let detached = self.detached {
            self.detached = nil
            detached.abandon(code: .shutdown, why: "stopping")
        }
        self.waiterTimer?.cancel()
        for waiter in self.waiting.removeAll() {
            waiter.local.openCompleted(reply: .generalFailure, bound: .unspecified)
        }
        let futures = self.live.values.map { tunnel -> EventLoopFuture<Void> in
            let promise = self.eventLoop.makePromise(of: Void.self)
            tunnel.shutdown(drainTimeout: drainTimeout) { promise.succeed(()) }
            return promise.futureResult
        }
        return EventLoopFuture.andAllComplete(futures, on: self.eventLoop)
    }
}
