import Logging
import NIOCore
import NIOPosix
import TunnelConfig
import TunnelCrypto
import TunnelEventLoop
import TunnelProtocol
import TunnelRuntime
import TunnelTUN
import TunnelTransport

/// The server's view of one tunnel connection: authorizes the client key, checks replays, logs who connected
/// and why they left, and serves stream requests with outbound connections on the connection's event loop.
final class ServerSession: TunnelConnectionDelegate {
    private let registry: ServerSessionRegistry
    private let connector: OutboundConnector
    private var logger: Logger
    private let handle: ServerSessionRegistry.Handle
    private var clientKey: PublicKey?
    private var clientName = "unauthenticated client"
    /// The comment after the client's key in the authorized keys.
    private var clientComment = ""
    /// A key that was not in the authorized keys (named when the failed handshake is logged).
    private var refusedKey: PublicKey?
    /// Where the connection comes from, as the registry counts sources.
    private let source: [UInt8]
    private var handshaking = true
    private let udpIdleTimeout: TimeAmount
    private let tun: ServerTUN?
    /// Full tunnel: the client's inner addresses (packets from any other source are dropped).
    private var ipv4: PacketAddress?
    private var ipv6: PacketAddress?
    /// Full tunnel: the client's slot in the server's routing table, and the device queue of this loop.
    private var slot: Int?
    private var queue = 0
    /// The client's IP packets come and go with their offload headers (negotiated).
    private var offload = false
    /// Full tunnel: the reader of that queue, to pick up replies the device already holds after a write.
    private var reader: NIOLoopBound<DeviceReader<ServerTUNQueue>>?
    /// Packets from the client waiting for the end of the current socket read.
    private var pendingPackets: [ByteBuffer] = []
    /// Names this session's streams reached lately and the addresses they resolved to: a browser opens many
    /// connections to one host, and each getaddrinfo may be a query to the resolver. Per session, so one
    /// client cannot time another's lookups; short-lived, since getaddrinfo gives no TTL.
    private var names = RecentCache<TargetAddress, [SocketAddress]>(capacity: 256, lifetime: .seconds(30))
    private var spoofedPackets = 0
    private var undeliveredPackets = 0
    /// How long a session whose connection broke is kept for its client to resume (docs/PROTOCOL.md §7).
    private let resumeGrace: TimeAmount
    /// The tunnel socket's settings (a resumed session's new connection gets them too).
    private let timings: TunnelTimings
    private var graceTimer: Scheduled<Void>?
    /// When the connection was lost; nil while none was (a resume can replace a connection that still looks alive here).
    private var detachedAt: NIODeadline?
    /// This connection's client resumed another session: the connection went to it, nothing is left here.
    private var handedOff = false

    init(
        registry: ServerSessionRegistry,
        connector: OutboundConnector,
        handle: ServerSessionRegistry.Handle,
        udpIdleTimeout: TimeAmount,
        resumeGrace: TimeAmount,
        timings: TunnelTimings,
        tun: ServerTUN?,
        source: [UInt8],
        logger: Logger
    ) {
        self.source = source
        self.resumeGrace = resumeGrace
        self.timings = timings
        self.udpIdleTimeout = udpIdleTimeout
        self.tun = tun
        self.registry = registry
        self.connector = connector
        self.handle = handle
        self.logger = logger
    }

    func tunnelAuthorize(_ key: PublicKey) -> Bool {
        guard let entry = self.registry.authorizedKeys.entry(for: key) else {
            self.refusedKey = key
            return false
        }
        self.clientKey = key
        self.clientComment = entry.comment
        self.clientName = entry.comment.isEmpty ? "client \(key)" : "client \(key) (\(entry.comment))"
        return true
    }

    func tunnelHandshakeFailed(_ tunnel: TunnelConnectionHandler, error: ProtocolError) -> Bool {
        TunnelMetrics.handshake(Self.outcome(of: error, refusedKey: self.refusedKey != nil))
        switch self.registry.shouldLogFailedHandshake(source: self.source) {
        case .suppress:
            break
        case .log(let before):
            var why = error.detail
            if let key = self.refusedKey {
                why = "client key \(key) is not in the authorized keys"
                if let entry = self.registry.authorizedKeys.entry(holdingPrivateKeyOf: key) {
                    why +=
                        ", but line \(entry.line) of the authorized keys holds its PRIVATE key: put the client's public key there "
                        + "(tunnel-client pubkey --key CLIENT.key prints it), and keep private keys off the server"
                }
            }
            self.logger.info("handshake with \(tunnel.remoteDescription) failed: \(why)")
            if before > 0 {
                self.logger.info("\(before) more failed handshake(s) from there in the minute before were not logged")
            }
        }
        return true
    }

    func tunnelCheckReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict {
        self.registry.checkReplay(key: key, timestamp: timestamp)
    }

    /// What a failed handshake counts as (metrics).
    static func outcome(of error: ProtocolError, refusedKey: Bool) -> TunnelMetrics.HandshakeOutcome {
        if refusedKey || error.code == .handshakeRejected { return .unknownKey }
        if error.code == .replayedHandshake { return .replay }
        if error.detail == "handshake timed out" { return .timeout }
        return .malformed
    }

    func tunnelEstablished(_ tunnel: TunnelConnectionHandler, session: EstablishedSession) {
        TunnelMetrics.handshake(.ok)
        self.finishHandshake()
        self.logger[metadataKey: "client"] = "\(session.peerStaticKey.base64.prefix(8))"
        tunnel.logger[metadataKey: "client"] = "\(session.peerStaticKey.base64.prefix(8))"
        let compression =
            session.peerParameters.features.contains(.compression)
            ? (tunnel.compressionActive ? ", compression on" : ", compression refused by policy") : ""
        self.logger.info(
            "\(self.clientName) connected from \(tunnel.remoteDescription) (\(session.cipher)\(compression))"
        )
    }

    func tunnelConfirmed(_ tunnel: TunnelConnectionHandler) {
        guard let key = self.clientKey else { return }
        let address = tunnel.remoteAddressWithoutPort
        let (previous, sharedBy) = self.registry.activate(key: key, handle: self.handle, address: address)
        // A reload that removed the key while this handshake was under way did not see this session yet (the
        // key was checked before): now that it is in the registry, look again. A reload after this point
        // finds it there and closes it.
        guard self.registry.authorizedKeys.entry(for: key) != nil else {
            self.logger.info("\(self.clientName): its key was removed while it connected; closing")
            tunnel.close(code: .notAuthorized)
            return
        }
        if let previous {
            self.logger.info("\(self.clientName) reconnected from \(address): closing its previous session")
            previous.eventLoop.execute {
                previous.handler.value.close(code: .replaced)
            }
        }
        if let candidate = tunnel.core.resumeCandidate,
            let stale = self.registry.registerResumable(self.handle, key: key, candidate: candidate)
        {
            // The client started a new session: one it kept from a broken connection will not be resumed.
            stale.eventLoop.execute {
                stale.handler.value.abandon(code: .replaced, why: "the client started a new session")
            }
        }
        if let sharedBy {
            let machines = sharedBy.joined(separator: " and ")
            self.logger.warning(
                "\(self.clientName) is in use on more than one machine at once: \(machines) keep replacing each other's session. Give each machine its own key (tunnel-client keygen) and list each in the authorized keys"
            )
        }
        if tunnel.fullTunnelActive, let tun = self.tun {
            self.startFullTunnel(tunnel, tun: tun, key: key)
        }
    }

    private func startFullTunnel(_ tunnel: TunnelConnectionHandler, tun: ServerTUN, key: PublicKey) {
        guard
            let (assignment, slot) = tun.attach(
                key: key,
                route: ServerTUN.Route(id: self.handle.id, handler: self.handle.handler),
                offload: tunnel.packetOffloadActive
            )
        else {
            self.logger.warning("\(self.clientName): the full-tunnel address pool is full; closing")
            tunnel.close(code: .resourceExhausted)
            return
        }
        self.slot = slot
        self.offload = tunnel.packetOffloadActive
        self.queue = tun.queue(of: self.handle.eventLoop)
        self.reader = tun.reader(of: self.handle.eventLoop)
        self.ipv4 = assignment.ipv4.map { PacketAddress($0.address) }
        self.ipv6 = assignment.ipv6.map { PacketAddress($0.address) }
        // Its packets are the latency path: skip NIO's write path for them (one descriptor scan per session).
        if !tunnel.enableDirectWrites() {
            self.logger.debug("\(self.clientName): socket descriptor not found; writing through the channel")
        }
        var payload = ByteBuffer()
        assignment.encode(into: &payload)
        tunnel.sendControl(payload)
        self.logger.info(
            "\(self.clientName): full tunnel with \(assignment.ipv4.map(\.description) ?? "-")\(assignment.ipv6.map { " and \($0)" } ?? "")"
        )
    }

    func tunnel(_ tunnel: TunnelConnectionHandler, receivedIPPacket packet: ByteBuffer) {
        // With offload the packet is the device's: its offload header (checked by the multiplexer), then IP.
        let ip = self.offload ? packet.skippingOffloadHeader() : packet
        guard self.tun != nil, let source = IPPacket.source(of: ip), source == self.ipv4 || source == self.ipv6
        else {
            // Anti-spoofing: only the client's own addresses get onto the server's network.
            if self.spoofedPackets == 0 {
                let from = IPPacket.source(of: ip).map { "\($0)" } ?? "a malformed header"
                self.logger.info("\(self.clientName): dropping packets from \(from), which is not its address")
            }
            self.spoofedPackets += 1
            return
        }
        self.pendingPackets.append(packet)
    }

    /// Writes the packets of one socket read to the device, after the read's records are processed: the
    /// writes (which run the kernel's whole forwarding path) come together, not between records.
    func tunnelReadFinished(_ tunnel: TunnelConnectionHandler) {
        guard !self.pendingPackets.isEmpty, let tun = self.tun else { return }
        let written = self.pendingPackets.count
        for packet in self.pendingPackets
        where !(self.offload ? tun.write(packet, queue: self.queue) : tun.writePlain(packet, queue: self.queue)) {
            self.undeliveredPackets += 1
        }
        self.pendingPackets.removeAll(keepingCapacity: true)
        // The kernel forwarded them inside those writes: replies may be waiting already. The answer to a
        // lone packet (a ping, a request to a host nearby) goes out before the read that finds the queue empty.
        self.reader?.value.readBack(sendingFirstAtOnce: written == 1)
    }

    func tunnel(_ tunnel: TunnelConnectionHandler, openRequested stream: TunnelStream) {
        if stream.kind == .udp {
            ServerUDPAssociation(
                stream: stream,
                eventLoop: self.handle.eventLoop,
                connector: self.connector,
                idleTimeout: self.udpIdleTimeout,
                logger: self.logger
            )
            .start()
            return
        }
        let target = stream.target
        var known: [SocketAddress]? = nil
        if case .domain = target.host { known = self.names.value(for: target, now: .now()) }
        self.connector.connect(to: target, known: known, on: self.handle.eventLoop) { outcome in
            switch outcome {
            case .connected(let channel, let resolved):
                if let resolved { self.names.store(resolved, for: target, now: .now()) }
                guard stream.isOpening, stream.tunnelIsUp else {
                    // The client gave up (RESET) or the tunnel went away while connecting.
                    channel.close(promise: nil)
                    stream.release()
                    return
                }
                let local = LocalStreamHandler()
                stream.attach(local)
                do {
                    try channel.pipeline.syncOperations.addHandler(local)
                } catch {
                    channel.close(promise: nil)
                    stream.completeOpen(reply: .generalFailure, bound: .unspecified)
                    return
                }
                stream.completeOpen(
                    reply: .succeeded,
                    bound: channel.localAddress?.targetAddress ?? .unspecified
                )
                TunnelMetrics.streamOpened(.succeeded)
                local.streamStarted()
            case .failed(let reply, let why):
                self.logger.debug("stream \(stream.id) to \(stream.target) failed: \(why)")
                TunnelMetrics.streamOpened(reply)
                if stream.isOpening {
                    stream.completeOpen(reply: reply, bound: .unspecified)
                } else {
                    stream.release()
                }
            }
        }
    }

    // MARK: - Status

    /// This session as `tunnel-server status` shows it (nil before its client is known).
    func report(streams: Bool, now: NIODeadline) -> SessionReport? {
        guard let key = self.clientKey else { return nil }
        let tunnel = self.handle.handler.value
        var report = SessionReport(
            key: key.base64,
            name: self.clientComment,
            remote: tunnel.remoteDescription,
            state: tunnel.core.isDetached ? "resumable" : "connected",
            sessionSeconds: tunnel.establishedAt.map { seconds(now - $0) } ?? 0
        )
        report.rttMilliseconds = milliseconds(tunnel.roundTrip)
        report.traffic = TrafficFigures(tunnel)
        if streams { report.streams = StreamReport.list(tunnel, now: now) }
        return report
    }

    // MARK: - Resumption (docs/PROTOCOL.md §7)

    func tunnelDetached(_ tunnel: TunnelConnectionHandler, error: ProtocolError) {
        guard let key = self.clientKey, tunnel.core.isResumable, !tunnel.fullTunnelActive else {
            tunnel.abandon(code: .internalError, why: error.detail)
            return
        }
        self.registry.detach(self.handle, key: key)
        self.detachedAt = .now()
        let grace = self.resumeGrace
        let streams = tunnel.multiplexer?.streamCount ?? 0
        self.logger.info(
            "\(self.clientName): connection lost (\(error.detail)); keeping its session \(grace.nanoseconds / 1_000_000_000) s for it to resume (\(streams) streams)"
        )
        self.graceTimer?.cancel()
        self.graceTimer = self.handle.eventLoop.assumeIsolated().scheduleTask(in: grace) {
            // Whether or not a resume claimed it meanwhile: one still detached now was not resumed in time.
            _ = self.registry.dropResumable(key: key, only: self.handle.id)
            guard tunnel.core.isDetached else { return }
            self.logger.info(
                "\(self.clientName): session not resumed within \(grace.nanoseconds / 1_000_000_000) s: \(tunnel.multiplexer?.streamCount ?? 0) streams reset"
            )
            tunnel.abandon(code: .timeout, why: "not resumed within the grace period")
        }
    }

    func tunnelResumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate? {
        self.registry.resumeCandidate(id: id, key: key)
    }

    /// This new connection's client proved it may resume a kept session: the connection (its socket, and the
    /// keys of its handshake) goes to that session, on that session's event loop.
    func tunnel(
        _ tunnel: TunnelConnectionHandler,
        resumeAccepted candidate: ResumeCandidate,
        connection: TunnelSession.Connection,
        peerCount: UInt64
    ) {
        self.handedOff = true
        self.finishHandshake()
        let kept = self.registry.claimResumable(id: candidate.sessionID)
        let descriptor = kept == nil ? nil : tunnel.duplicateSocket()
        // This connection's own session is spent either way: its socket goes on through the second descriptor,
        // or the client finds it closed and its next attempt learns that the session is gone.
        tunnel.closeQuietly()
        guard let kept else {
            self.logger.info("\(self.clientName): the session to resume was given up meanwhile; closing")
            return
        }
        guard let descriptor else {
            self.logger.warning("\(self.clientName): cannot hand the connection to the resumed session; giving it up")
            kept.eventLoop.execute {
                let handler = kept.handler.value
                handler.releaseConnection()
                handler.abandon(code: .internalError, why: "the resumed connection could not be used")
            }
            return
        }
        self.handOver(connection, peerCount: peerCount, descriptor: descriptor, to: kept)
    }

    /// Hands a connection (a second descriptor of its socket, and its keys) to the resumed session `kept`,
    /// on that session's event loop.
    private func handOver(
        _ connection: TunnelSession.Connection,
        peerCount: UInt64,
        descriptor: Int32,
        to kept: ServerSessionRegistry.Handle
    ) {
        let logger = self.logger
        let timings = self.timings
        kept.eventLoop.execute {
            let handler = kept.handler.value
            // The old connection may not have broken here yet (a path gone silent): it is given up now.
            handler.releaseConnection()
            let adopted = { (result: Result<Void, any Error>) in
                switch result {
                case .success:
                    handler.takeConnection(connection, peerCount: peerCount)
                case .failure(let error):
                    logger.info("cannot take the resumed connection over: \(error)")
                    handler.abandon(code: .internalError, why: "the resumed connection could not be used")
                }
            }
            // The channel is made on the session's own loop, where the handler lives.
            if let loop = kept.eventLoop as? EpollEventLoop {
                adopted(
                    EpollStreamChannel.adopt(descriptor, on: loop) { channel in
                        try TunnelSocket.configure(channel, timings: timings, logger: logger)
                        try channel.pipeline.syncOperations.addHandler(handler)
                    }.map { _ in }
                )
                return
            }
            let bound = NIOLoopBound(handler, eventLoop: kept.eventLoop)
            ClientBootstrap(group: kept.eventLoop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try TunnelSocket.configure(channel, timings: timings, logger: logger)
                        try channel.pipeline.syncOperations.addHandler(bound.value)
                    }
                }
                .withConnectedSocket(descriptor)
                .assumeIsolated()
                .whenComplete { adopted($0.map { _ in }) }
        }
    }

    func tunnelResumed(_ tunnel: TunnelConnectionHandler, replayed: Int) {
        TunnelMetrics.resumed()
        self.graceTimer?.cancel()
        self.graceTimer = nil
        guard let key = self.clientKey else { return }
        let address = tunnel.remoteAddressWithoutPort
        _ = self.registry.activate(key: key, handle: self.handle, address: address)
        if let candidate = tunnel.core.resumeCandidate {
            _ = self.registry.registerResumable(self.handle, key: key, candidate: candidate)
        }
        // A connection that still looked alive here (its path went silent) was replaced without an outage seen.
        let outage = self.detachedAt.map { "after \((NIODeadline.now() - $0).nanoseconds / 1_000_000) ms" }
        self.detachedAt = nil
        self.logger.info(
            "\(self.clientName) resumed its session from \(tunnel.remoteDescription) \(outage ?? "in place of a connection gone silent"): \(tunnel.multiplexer?.streamCount ?? 0) streams kept, \(replayed) records (\(tunnel.core.lastReplayBytes) bytes) sent again"
        )
    }

    func tunnelClosed(_ tunnel: TunnelConnectionHandler, error: ProtocolError?) {
        self.finishHandshake()
        if self.handedOff {
            self.registry.remove(self.handle, key: nil)
            return
        }
        self.pendingPackets.removeAll()
        self.registry.remove(self.handle, key: self.clientKey)
        if self.clientKey != nil { self.registry.sessionEnded(TrafficFigures(tunnel)) }
        if let tun = self.tun, let key = self.clientKey, let slot = self.slot {
            tun.detach(key: key, id: self.handle.id, slot: slot)
            let (refused, delayed) = (tunnel.refusedPackets, tunnel.delayedPacketDrops)
            if self.spoofedPackets > 0 || self.undeliveredPackets > 0 || tunnel.droppedPackets > 0 || refused > 0
                || delayed > 0
            {
                self.logger.info(
                    "\(self.clientName): packets dropped: \(self.spoofedPackets) with a source not its own, \(refused) with an offload header refused, \(self.undeliveredPackets) the TUN device refused, \(tunnel.droppedPackets) over the send queue limit, \(delayed) for waiting too long in it"
                )
            }
        }
        if tunnel.session == nil {
            // Handshake failures were logged by the handler; nothing was served.
            return
        }
        if let error {
            self.logger.info("\(self.clientName) disconnected: \(error.detail)")
        } else {
            self.logger.info("\(self.clientName) disconnected (closed by the client)")
        }
    }

    private func finishHandshake() {
        guard self.handshaking else { return }
        self.handshaking = false
        self.registry.endHandshake(self.handle.id)
    }
}
