import Logging
import NIOCore
import NIOPosix
import TunnelConfig
import TunnelProtocol
import TunnelRuntime
import TunnelTUN
import TunnelTransport

#if canImport(Glibc)
import Glibc
#endif

/// `tunnel-client --full-tunnel`: the client's TUN device and everything it changes on the host to send
/// all traffic into it (docs/PROTOCOL.md §5).
///
/// At start it undoes what a crashed run left behind, notes how the host reaches the server (and the
/// excluded networks) before anything changes, creates the device and, with `--kill-switch`, blocks all
/// other traffic. The first assignment from the server then brings up the addresses, the routes (two
/// half-default routes per family, so the original default route stays), and the resolver. Every change is
/// journalled and undone on exit, or at the next start after a crash. When the tunnel drops, the device and
/// routes stay (nothing leaks; packets are dropped) until the manager has reconnected.
///
/// Runs on the client's one event loop.
final class ClientFullTunnel {
    private let eventLoop: any EventLoop
    private let settings: ClientFullTunnelSettings
    private let server: IPAddress
    private let device: any PacketDevice
    /// Runs the host's commands and names its resolver file (`HostNetwork.live`, or a test's double).
    private let host: HostNetwork
    private let journal: HostChangeJournal
    /// Held while this process owns the journal's changes.
    private let lock: HostChangeLock
    private let serverPath: HostNetwork.Path?
    private let excludePaths: [(CIDR, HostNetwork.Path)]
    private var logger: Logger
    private var assignment: TunnelAssignment?
    private var ipv4: PacketAddress?
    private var ipv6: PacketAddress?
    /// The tunnel packets go to (nil while it is down).
    private var tunnel: (any PacketTunnel)?
    private var readChannel: (any Channel)?
    /// The device's reader, for `readBack()` after writes.
    private var reader: DeviceReader<ClientFullTunnel>?
    /// A TCP packet from the tunnel was written to the device in the current socket read.
    private var wroteTCPToDevice = false
    /// The tunnel's IP packets carry offload headers (negotiated): they go to the device as they come.
    private var offload = false
    /// Whether this end can offer offload headers (its device has them).
    var offersOffload: Bool { self.device.hasOffloadHeaders }
    private var droppedWhileDown = 0
    /// Called for each packet that arrives while the tunnel is down (the manager cuts its backoff short).
    var onPacketWhileDown: (() -> Void)?
    private var undeliverable = 0

    struct SetupError: StartupFailure {
        var description: String
    }

    /// Prepares the host: crash recovery, the original paths, the device, and the kill switch. `device`
    /// (a TUN device named by the settings unless given) and `host` are a test's doubles when given.
    init(
        eventLoop: any EventLoop,
        settings: ClientFullTunnelSettings,
        server: IPAddress,
        port: Int,
        logger: Logger,
        device: (any PacketDevice)? = nil,
        host: HostNetwork = .live
    ) throws {
        self.eventLoop = eventLoop
        self.host = host
        self.settings = settings
        self.server = server
        self.logger = logger
        guard SystemCommand.locate("ip") != nil else {
            throw SetupError(description: "--full-tunnel needs the ip tool (apt-get install iproute2)")
        }
        if settings.killSwitch, SystemCommand.locate("nft") == nil {
            throw SetupError(description: "--kill-switch needs nftables (apt-get install nftables)")
        }
        let statePath = CrashRecovery.clientStatePath(settings)
        // Only a process that owns the journal may undo what it records: a second client must not dismantle
        // a running one's routes, resolver and kill switch as if they were left by a crash.
        self.lock = try CrashRecovery.takeOver(
            statePath: statePath,
            program: "tunnel-client --full-tunnel",
            logger: logger,
            commands: host.commands
        )

        // How the host reaches the server and the excluded networks now, before the tunnel takes over.
        self.serverPath = host.currentPath(to: server)
        var excludePaths: [(CIDR, HostNetwork.Path)] = []
        for network in settings.exclude {
            guard let path = host.currentPath(to: network.address) else {
                logger.warning("--exclude \(network): no route to it now; it will go through the tunnel")
                continue
            }
            excludePaths.append((network, path))
        }
        self.excludePaths = excludePaths

        if let device {
            self.device = device
        } else {
            do {
                self.device = try TUNDevice(requested: settings.deviceName, offloadHeaders: true)
            } catch {
                self.lock.release()
                throw SetupError(description: "\(error)")
            }
        }
        self.journal = HostChangeJournal(path: statePath, commands: host.commands)
        if settings.killSwitch {
            let table = Self.killSwitchTable
            do {
                try host.installTable(
                    family: "inet",
                    name: table,
                    ruleset: FirewallRules.killSwitchTable(
                        name: table,
                        device: self.device.name,
                        server: server,
                        port: port,
                        exclude: settings.exclude.map(\.description)
                    ),
                    journal: self.journal
                )
            } catch {
                self.journal.rollback()
                self.device.closeWriters()
                self.device.closeReaders()
                throw SetupError(description: "--kill-switch: \(error)")
            }
            logger.info("kill switch on: only the tunnel (\(self.device.name)) and the server \(server) are reachable")
        }
    }

    static let killSwitchTable = "tunnel_client_killswitch"

    /// Starts reading packets from the device, in buffers that fit the MTU (a read never truncates a packet:
    /// the kernel hands the device nothing larger).
    private func startReading(mtu: Int) {
        let capacity = self.device.readCapacity(mtu: mtu)
        let owner = NIOLoopBound(self, eventLoop: self.eventLoop)
        return NIOPipeBootstrap(group: self.eventLoop)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: capacity))
            .channelOption(.maxMessagesPerRead, value: 32)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let reader = DeviceReader(
                        sink: owner.value,
                        descriptor: owner.value.device.readDescriptor(),
                        packetCapacity: capacity
                    )
                    try channel.pipeline.syncOperations.addHandler(reader)
                    owner.value.reader = reader
                }
            }
            .takingOwnershipOfDescriptor(input: self.device.readDescriptor())
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let channel): self.readChannel = channel
                case .failure(let error): self.logger.error("cannot read from \(self.device.name): \(error)")
                }
            }
    }

    // MARK: - Assignments

    /// The server assigned addresses on `tunnel`. The first assignment brings the tunnel up; later ones
    /// (after a reconnect) only change what changed.
    func assigned(_ assignment: TunnelAssignment, on tunnel: any PacketTunnel) throws(SetupError) {
        if let current = self.assignment {
            if current != assignment { try self.reconfigure(from: current, to: assignment) }
        } else {
            try self.bringUp(assignment)
        }
        self.assignment = assignment
        self.ipv4 = assignment.ipv4.map { PacketAddress($0.address) }
        self.ipv6 = assignment.ipv6.map { PacketAddress($0.address) }
        self.tunnel = tunnel
        self.offload = tunnel.packetOffloadActive
        if self.device.hasOffloadHeaders && !self.device.setOffload(self.offload) && self.offload {
            self.logger.debug("\(self.device.name): the kernel refused segmentation offload")
        }
        if self.droppedWhileDown > 0 {
            self.logger.info("dropped \(self.droppedWhileDown) packet(s) while the tunnel was down")
            self.droppedWhileDown = 0
        }
    }

    private func bringUp(_ assignment: TunnelAssignment) throws(SetupError) {
        let name = self.device.name
        do {
            // The server and the excluded networks keep their original way out.
            if let path = self.serverPath {
                try self.host.addRoute(
                    self.hostPrefix(self.server),
                    ipv6: self.server.isIPv6,
                    along: path,
                    journal: self.journal
                )
            }
            for (network, path) in self.excludePaths {
                try self.host.addRoute(
                    network.description,
                    ipv6: network.address.isIPv6,
                    along: path,
                    journal: self.journal
                )
            }
            let addresses = [assignment.ipv4, assignment.ipv6].compactMap { $0 }
            try self.host.configureDevice(name, mtu: assignment.mtu, addresses: addresses)
            if self.device.hasOffloadHeaders { self.host.limitSegments(of: name) }
            // Routes through the device vanish with it, so they need no journal entry.
            let journal = HostChangeJournal(path: nil)
            for half in ["0.0.0.0/1", "128.0.0.0/1"] {
                try self.host.addRoute(half, ipv6: false, arguments: ["dev", name], journal: journal)
            }
            if assignment.ipv6 != nil {
                for half in ["::/1", "8000::/1"] {
                    try self.host.addRoute(half, ipv6: true, arguments: ["dev", name], journal: journal)
                }
            } else if Self.hostHasIPv6 {
                // No IPv6 inside the tunnel: block it rather than let it leak past.
                for half in ["::/1", "8000::/1"] {
                    try self.host.addRoute(
                        half,
                        ipv6: true,
                        type: "unreachable",
                        arguments: [],
                        journal: self.journal
                    )
                }
            }
        } catch {
            throw SetupError(description: "setting up full-tunnel routes: \(error)")
        }
        try self.pointResolver(assignment)
        self.startReading(mtu: assignment.mtu)
        var summary = "full tunnel up on \(name): \(assignment.ipv4.map(\.description) ?? "-")"
        if let v6 = assignment.ipv6 {
            summary += " and \(v6)"
        } else {
            summary += ", IPv6 blocked (the server has no IPv6 pool)"
        }
        summary += ", MTU \(assignment.mtu)"
        self.logger.notice("\(summary)")
    }

    private func pointResolver(_ assignment: TunnelAssignment) throws(SetupError) {
        let servers: [IPAddress]
        switch self.settings.dns {
        case .unchanged:
            self.logger.warning("--dns off: /etc/resolv.conf is left alone, so DNS queries may go around the tunnel")
            return
        case .servers(let list): servers = list
        case .fromServer: servers = assignment.dnsServers
        }
        guard !servers.isEmpty else {
            self.logger.warning(
                "the server named no DNS server: /etc/resolv.conf is left alone (DNS may leak); pass --dns IP"
            )
            return
        }
        // DNS servers always go through the tunnel, even one on the local network (unless excluded).
        let journal = HostChangeJournal(path: nil)
        for server in servers where !self.settings.exclude.contains(where: { $0.contains(server.bytes) }) {
            let route = self.hostPrefix(server)
            if !server.isIPv6 || assignment.ipv6 != nil {
                do {
                    try self.host.addRoute(
                        route,
                        ipv6: server.isIPv6,
                        arguments: ["dev", self.device.name],
                        journal: journal
                    )
                } catch {
                    self.logger.warning("cannot route DNS server \(server) into the tunnel: \(error)")
                }
            }
        }
        if let problem = self.host.pointResolver(at: servers, journal: self.journal) {
            throw SetupError(
                description:
                    "pointing the resolver at \(servers.map(\.description).joined(separator: ", ")): \(problem)"
            )
        }
        self.logger.info("DNS through the tunnel: \(servers.map(\.description).joined(separator: ", "))")
    }

    private func reconfigure(from old: TunnelAssignment, to new: TunnelAssignment) throws(SetupError) {
        do {
            if let a = old.ipv4, let b = new.ipv4, a != b {
                try self.host.readdress(self.device.name, from: a, to: b)
            }
            if let a = old.ipv6, let b = new.ipv6, a != b {
                try self.host.readdress(self.device.name, from: a, to: b)
            }
        } catch {
            throw SetupError(description: "changing the tunnel's addresses: \(error)")
        }
        if (old.ipv6 == nil) != (new.ipv6 == nil) || old.mtu != new.mtu {
            self.logger.warning(
                "the server's full-tunnel settings changed (IPv6 pool or MTU); restart tunnel-client to apply them"
            )
        }
        self.logger.notice(
            "the server assigned new addresses: \(new.ipv4.map(\.description) ?? "-")\(new.ipv6.map { " and \($0)" } ?? "")"
        )
    }

    private func hostPrefix(_ address: IPAddress) -> String {
        "\(address)/\(address.isIPv6 ? 128 : 32)"
    }

    private static var hostHasIPv6: Bool {
        HostNetwork.sysctl("net.ipv6.conf.all.disable_ipv6").map { $0 != "1" } ?? false
    }

    // MARK: - Packets

    /// The tunnel `tunnel` is gone: packets are dropped until a new one is assigned.
    func tunnelLost(_ tunnel: any PacketTunnel) {
        if self.tunnel === tunnel { self.tunnel = nil }
    }

    /// A packet the device read (from an app on this host).
    func packetFromDevice(_ packet: ByteBuffer) {
        guard let tunnel = self.tunnel else {
            self.droppedWhileDown += 1
            self.onPacketWhileDown?()
            return
        }
        // Only packets from our own addresses: the server would drop anything else (link-local chatter).
        let headers = self.device.hasOffloadHeaders
        let ip = headers ? packet.skippingOffloadHeader() : packet
        guard let source = IPPacket.source(of: ip), source == self.ipv4 || source == self.ipv6 else { return }
        tunnel.enqueueIPPacket(packet, offloadHeader: headers)  // flushed by `deviceReadComplete`
    }

    /// The device's read burst is over: send what it queued now.
    func deviceReadComplete() {
        self.tunnel?.flushNow()
    }

    /// A packet from the server, for an app on this host.
    /// With offload the packet is the device's: its offload header (checked by the multiplexer), then IP.
    func packetFromTunnel(_ packet: ByteBuffer) {
        if self.offload ? self.device.write(packet) : self.device.writePlain(packet) {
            // Only TCP gets an answer inside the write (an ACK, the next segments): after a ping reply or a
            // DNS answer the read would find nothing, and it would delay the app the packet woke.
            if !self.wroteTCPToDevice && IPPacket.isTCP(self.offload ? packet.skippingOffloadHeader() : packet) {
                self.wroteTCPToDevice = true
            }
        } else {
            self.undeliverable += 1
        }
    }

    /// The tunnel's socket read is processed. The kernel ran the written packets through this host's stack
    /// inside the writes, so what they set off (a TCP ACK, the next segments of an upload the ACKs let go)
    /// may be queued on the device already: send it now rather than after another turn of the event loop.
    func tunnelReadFinished() {
        guard self.wroteTCPToDevice else { return }
        self.wroteTCPToDevice = false
        self.reader?.readBack()
    }

    // MARK: - Shutdown

    /// Undoes every change (routes, resolver, kill switch) and removes the device.
    func shutdown() {
        self.tunnel = nil
        self.reader = nil
        if let note = DeviceStatistics.transmitDropsNote(device: self.device.name, destination: "the tunnel") {
            self.logger.info("\(note)")
        }
        for problem in self.journal.rollback() { self.logger.warning("undoing full-tunnel changes: \(problem)") }
        if let channel = self.readChannel {
            channel.close(promise: nil)
            self.readChannel = nil
        } else {
            self.device.closeReaders()
        }
        self.device.closeWriters()
        self.lock.release()
        self.logger.info("full tunnel down: routes, resolver and firewall restored")
    }
}

extension ClientFullTunnel: DevicePacketSink {
    func devicePacket(_ packet: ByteBuffer) { self.packetFromDevice(packet) }
    func deviceBurstFinished() { self.deviceReadComplete() }
}

/// Where the full tunnel sends the packets apps on this host send: the tunnel connection (or a test's
/// double).
protocol PacketTunnel: AnyObject {
    /// Queues one packet (with `offloadHeader`, as the device read it: header first); flushed by `flushNow`.
    /// False when it was dropped.
    @discardableResult
    func enqueueIPPacket(_ packet: ByteBuffer, offloadHeader: Bool) -> Bool
    /// Whether IP packets cross it with their offload headers (negotiated).
    var packetOffloadActive: Bool { get }
    /// Sends what is queued now.
    func flushNow()
}

extension TunnelConnectionHandler: PacketTunnel {}
