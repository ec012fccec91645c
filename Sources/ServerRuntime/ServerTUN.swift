import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import TunnelConfig
import TunnelCrypto
import TunnelProtocol
import TunnelRuntime
import TunnelTUN
import TunnelTransport

#if canImport(Glibc)
import Glibc
#endif

/// `tunnel-server --tun`: the server's TUN device, the address pools, NAT, the DNS forwarder, and the
/// routing of packets between the device and the client sessions (docs/PROTOCOL.md §5).
///
/// Packets from a client go to the device only when their source is that client's address (anti-spoofing,
/// like WireGuard's cryptokey routing); packets the device reads go to the session that owns their
/// destination. The device has one queue per event loop; a session writes to its own loop's queue, one
/// `write(2)` per packet, and the kernel steers a flow's replies to the queue its packets came from, so they
/// are read on the session's loop (packets for a session on another loop go there in batches).
final class ServerTUN: Sendable {
    /// A session's place in the routing table.
    struct Route: Sendable {
        let id: ObjectIdentifier
        let handler: NIOLoopBound<TunnelConnectionHandler>
        /// The session's event loop, compared by identity per packet.
        let loop: ObjectIdentifier

        init(id: ObjectIdentifier, handler: NIOLoopBound<TunnelConnectionHandler>) {
            self.id = id
            self.handler = handler
            self.loop = ObjectIdentifier(handler.eventLoop)
        }
    }

    private struct State {
        /// The session of each pool address: routing a packet is arithmetic and an index, no hashing.
        var router: PacketRouter<PublicKey, Route>
        var closed = false
        /// Sessions whose client takes no offload headers: while there is one, the device hands over only
        /// finished packets (a segment to split could not go to that client).
        var plainSessions: Set<ObjectIdentifier> = []
        /// Whether the device's offload is on.
        var offloading = false

        init(pool: AddressPool<PublicKey>) {
            self.router = PacketRouter(pool: pool)
        }
    }

    let device: any PacketDevice
    /// The device queue each event loop reads and writes (one queue per loop).
    private let queueOfLoop: [ObjectIdentifier: Int]
    /// What every client is told besides its own addresses.
    let template: TunnelAssignment
    private let state: NIOLockedValueBox<State>
    private let prefix4: Int
    private let prefix6: Int?
    private let journal: NIOLockedValueBox<HostChangeJournal>
    /// Held while this server owns the journal's changes.
    private let lock: HostChangeLock
    private let readChannels = NIOLockedValueBox<[any Channel]>([])
    /// The reader of each queue, for `reader(of:)`.
    private let readers: NIOLockedValueBox<[NIOLoopBound<DeviceReader<ServerTUNQueue>>?]>
    private let forwarder: NIOLoopBoundBox<DNSForwarder?>
    private let loop: any EventLoop
    private let logger: Logger
    /// How long a client's addresses are kept from other clients after its session ended (its resume grace:
    /// it may be reconnecting, and its apps' connections on those addresses wait for it).
    private let leaseHold: TimeAmount

    private init(
        device: any PacketDevice,
        loops: [any EventLoop],
        pool: AddressPool<PublicKey>,
        template: TunnelAssignment,
        journal: HostChangeJournal,
        lock: HostChangeLock,
        forwarder: NIOLoopBoundBox<DNSForwarder?>,
        loop: any EventLoop,
        leaseHold: TimeAmount,
        logger: Logger
    ) {
        self.leaseHold = leaseHold
        self.lock = lock
        self.device = device
        var queueOfLoop: [ObjectIdentifier: Int] = [:]
        for (index, loop) in loops.enumerated() { queueOfLoop[ObjectIdentifier(loop)] = index }
        self.queueOfLoop = queueOfLoop
        self.readers = NIOLockedValueBox(Array(repeating: nil, count: loops.count))
        self.state = NIOLockedValueBox(State(pool: pool))
        self.prefix4 = pool.ipv4.prefixLength
        self.prefix6 = pool.ipv6?.prefixLength
        self.template = template
        self.journal = NIOLockedValueBox(journal)
        self.forwarder = forwarder
        self.loop = loop
        self.logger = logger
    }

    struct SetupError: StartupFailure {
        var description: String
    }

    /// The nftables table of a device.
    static func tableName(device: String) -> String {
        "tunnel_server_" + String(device.map { $0.isLetter || $0.isNumber ? $0 : "_" })
    }

    /// Creates and configures the device, forwarding, NAT and the DNS forwarder, and starts reading. Every
    /// change goes into the journal at `statePath` as it is made, so that a server killed without cleaning up
    /// has it undone at its next start (or by `--recover-only`).
    static func start(
        settings: ServerTUNSettings,
        policy: DestinationPolicy,
        statePath: String,
        serverKey: PublicKey,
        group: any EventLoopGroup,
        leaseHold: TimeAmount,
        logger: Logger
    ) async throws -> ServerTUN {
        let pool6: (IPAddress, Int)?
        switch settings.pool6 {
        case .none: pool6 = nil
        case .network(let cidr): pool6 = (cidr.address, cidr.prefixLength)
        case .automatic:
            // A unique local /64 (RFC 4193) whose global ID comes from the server key: stable across restarts.
            let id = serverKey.bytes
            pool6 = (
                IPAddress(
                    bytes: [0xFD, id[0], id[1], id[2], id[3], id[4], 0x00, 0x77] + [UInt8](repeating: 0, count: 8)
                )!, 64
            )
        }
        let pool: AddressPool<PublicKey>
        do {
            pool = try AddressPool(
                ipv4: settings.pool.address,
                prefixLength: settings.pool.prefixLength,
                ipv6: pool6?.0,
                prefixLength: pool6?.1 ?? 64
            )
        } catch {
            throw SetupError(description: "--tun-pool: \(error)")
        }
        guard SystemCommand.locate("ip") != nil else {
            throw SetupError(description: "--tun needs the ip tool (apt-get install iproute2)")
        }
        guard SystemCommand.locate("nft") != nil else {
            throw SetupError(description: "--tun needs nftables for NAT (apt-get install nftables)")
        }
        // Before anything changes: what a killed run left (its table, forwarding turned on) goes first, so
        // that the original forwarding setting is the one recorded again.
        let lock = try CrashRecovery.takeOver(statePath: statePath, program: "tunnel-server --tun", logger: logger)
        // One device queue per event loop: replies to a session's packets come back on its own loop.
        let loops = Array(group.makeIterator())
        let device: any PacketDevice
        do {
            device = try TUNDevice(requested: settings.deviceName, queues: loops.count, offloadHeaders: true)
        } catch {
            lock.release()
            throw SetupError(description: "\(error)")
        }
        let journal = HostChangeJournal(path: statePath)
        let gateway4 = TunnelAssignment.Interface(
            address: pool.gatewayV4.ipAddress,
            prefixLength: pool.ipv4.prefixLength
        )
        let gateway6 = pool.gatewayV6.map {
            TunnelAssignment.Interface(address: $0.ipAddress, prefixLength: pool.ipv6!.prefixLength)
        }
        let loop = group.next()
        let forwarder = NIOLoopBoundBox<DNSForwarder?>.makeEmptyBox(eventLoop: loop)
        var template = TunnelAssignment(mtu: settings.mtu, dnsServers: settings.dns)
        do {
            try HostNetwork.live.configureDevice(
                device.name,
                mtu: settings.mtu,
                addresses: [gateway4] + (gateway6.map { [$0] } ?? [])
            )
            if device.hasOffloadHeaders { HostNetwork.live.limitSegments(of: device.name) }
            guard HostNetwork.setSysctl("net.ipv4.ip_forward", "1", journal: journal) else {
                throw SetupError(description: "cannot turn on IPv4 forwarding (net.ipv4.ip_forward)")
            }
            if pool.ipv6 != nil, !HostNetwork.setSysctl("net.ipv6.conf.all.forwarding", "1", journal: journal) {
                throw SetupError(
                    description: "cannot turn on IPv6 forwarding (net.ipv6.conf.all.forwarding); use --tun-pool6 none"
                )
            }
            let table = Self.tableName(device: device.name)
            try HostNetwork.live.installTable(
                family: "inet",
                name: table,
                ruleset: FirewallRules.serverTable(
                    name: table,
                    device: device.name,
                    pool4: "\(pool.ipv4)",
                    pool6: pool.ipv6.map { "\($0)" },
                    gateways: [gateway4.address] + (gateway6.map { [$0.address] } ?? []),
                    destinations: Self.destinations(policy)
                ),
                journal: journal
            )
            if settings.dns.isEmpty {
                // Our own forwarder on the gateway addresses, asking this host's resolvers.
                let text =
                    HostChangeJournal.readFile("/etc/resolv.conf").map { String(decoding: $0, as: UTF8.self) } ?? ""
                let upstreams = ResolverFile.nameservers(in: text).compactMap {
                    try? SocketAddress(ipAddress: $0.description, port: 53)
                }
                if upstreams.isEmpty {
                    logger.warning(
                        "no nameserver in /etc/resolv.conf: full-tunnel clients get no DNS server (set --tun-dns)"
                    )
                } else {
                    var addresses = [try SocketAddress(ipAddress: gateway4.address.description, port: 53)]
                    if let gateway6 {
                        addresses.append(try SocketAddress(ipAddress: gateway6.address.description, port: 53))
                    }
                    let listen = addresses  // a constant, for the closure sent to the loop
                    try await loop.flatSubmit {
                        let dns = DNSForwarder(eventLoop: loop, upstreams: upstreams, logger: logger)
                        forwarder.value = dns
                        return dns.start(on: listen)
                    }.get()
                    template.dnsServers = [gateway4.address] + (gateway6.map { [$0.address] } ?? [])
                }
            }
        } catch {
            try? await loop.submit { forwarder.value?.stop() }.get()
            journal.rollback()
            lock.release()
            device.closeWriters()
            device.closeReaders()
            throw error as? SetupError ?? SetupError(description: "setting up \(device.name): \(error)")
        }

        let tun = ServerTUN(
            device: device,
            loops: loops,
            pool: pool,
            template: template,
            journal: journal,
            lock: lock,
            forwarder: forwarder,
            loop: loop,
            leaseHold: leaseHold,
            logger: logger
        )
        for (queue, queueLoop) in loops.enumerated() {
            let channel: any Channel
            do {
                channel = try await NIOPipeBootstrap(group: queueLoop)
                    .channelOption(
                        .recvAllocator,
                        value: FixedSizeRecvByteBufferAllocator(capacity: device.readCapacity(mtu: settings.mtu))
                    )
                    .channelOption(.maxMessagesPerRead, value: 32)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            let reader = DeviceReader(
                                sink: ServerTUNQueue(tun: tun, loop: channel.eventLoop),
                                descriptor: device.readDescriptor(queue: queue),
                                packetCapacity: device.readCapacity(mtu: settings.mtu)
                            )
                            try channel.pipeline.syncOperations.addHandler(reader)
                            tun.readers.withLockedValue {
                                $0[queue] = NIOLoopBound(reader, eventLoop: channel.eventLoop)
                            }
                        }
                    }
                    .takingOwnershipOfDescriptor(input: device.readDescriptor(queue: queue))
                    .get()
            } catch {
                // Undo everything: the channels made so far own (and close) their descriptors; the rest are ours.
                for unused in queue..<loops.count { Glibc.close(device.readDescriptor(queue: unused)) }
                await tun.stop()
                throw SetupError(description: "reading from \(device.name): \(error)")
            }
            tun.readChannels.withLockedValue { $0.append(channel) }
        }
        let dns = template.dnsServers.isEmpty ? "none" : template.dnsServers.map(\.description).joined(separator: ", ")
        logger.info(
            "full tunnel on \(device.name): pool \(pool.ipv4)\(pool.ipv6.map { " and \($0)" } ?? ""), MTU \(settings.mtu), DNS \(dns), NAT table inet \(Self.tableName(device: device.name))"
        )
        return tun
    }

    /// The destination policy as the firewall's rules for clients' packets.
    static func destinations(_ policy: DestinationPolicy) -> FirewallRules.ClientDestinations {
        let rules = policy.packetRules
        func pairs(_ list: [DestinationPolicy.PacketRule]) -> [(network: String, allow: Bool)] {
            list.map { (network: $0.network.description, allow: $0.allow) }
        }
        return FirewallRules.ClientDestinations(
            ordered4: pairs(rules.ordered4),
            builtIn4: rules.builtIn4.map(\.description),
            ordered6: pairs(rules.ordered6),
            builtIn6: rules.builtIn6.map(\.description),
            embedded: pairs(rules.embedded)
        )
    }

    /// Removes NAT, restores forwarding, stops the forwarder and closes the device.
    func stop() async {
        if let note = DeviceStatistics.transmitDropsNote(device: self.device.name, destination: "clients") {
            self.logger.info("\(note)")
        }
        self.state.withLockedValue { state in
            state.closed = true
            state.router.removeAll()
        }
        let channels = self.readChannels.withLockedValue { channels in
            defer { channels = [] }
            return channels
        }
        for channel in channels { try? await channel.close() }
        let forwarder = self.forwarder
        try? await self.loop.submit { forwarder.value?.stop() }.get()
        let problems = self.journal.withLockedValue { $0.rollback() }
        for problem in problems { self.logger.warning("undoing the full-tunnel setup: \(problem)") }
        self.lock.release()
        self.device.closeWriters()
    }

    /// The device queue `loop` writes to (its own: replies then come back on that loop).
    func queue(of loop: any EventLoop) -> Int {
        self.queueOfLoop[ObjectIdentifier(loop)] ?? 0
    }

    /// Writes a packet from a client to the device, on `queue` (see `queue(of:)`): a device packet (offload
    /// header first).
    func write(_ packet: ByteBuffer, queue: Int) -> Bool {
        self.device.write(packet, queue: queue)
    }

    /// Writes an IP packet without offload header from a client to the device, on `queue`.
    func writePlain(_ packet: ByteBuffer, queue: Int) -> Bool {
        self.device.writePlain(packet, queue: queue)
    }

    /// The reader of the device queue `loop` reads, for a session on `loop` to call `readBack()` on after
    /// writing packets.
    func reader(of loop: any EventLoop) -> NIOLoopBound<DeviceReader<ServerTUNQueue>>? {
        guard let queue = self.queueOfLoop[ObjectIdentifier(loop)],
            let reader = self.readers.withLockedValue({ $0[queue] }), reader.eventLoop === loop
        else { return nil }
        return reader
    }

    // MARK: - Sessions

    /// Gives a client its addresses and routes packets for them to `route`; `offload` says whether it takes
    /// offload headers. Nil when the pool is full.
    func attach(key: PublicKey, route: Route, offload: Bool) -> (assignment: TunnelAssignment, slot: Int)? {
        let lease: AddressPool<PublicKey>.Lease? = self.state.withLockedValue { state in
            guard !state.closed else { return nil }
            let seed = key.bytes.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let lease = state.router.attach(
                key: key,
                seed: seed,
                route: route,
                owner: route.id,
                now: NIODeadline.now().uptimeNanoseconds
            )
            if lease != nil && !offload { state.plainSessions.insert(route.id) }
            self.updateOffload(&state)
            return lease
        }
        guard let lease else { return nil }
        var assignment = self.template
        assignment.ipv4 = TunnelAssignment.Interface(address: lease.ipv4.ipAddress, prefixLength: self.prefix4)
        if let v6 = lease.ipv6, let prefix6 = self.prefix6 {
            assignment.ipv6 = TunnelAssignment.Interface(address: v6.ipAddress, prefixLength: prefix6)
        }
        return (assignment, lease.slot)
    }

    /// The session `id` of `key` ended: its route goes, unless a newer session of the key took the slot;
    /// its addresses are held for it for `leaseHold`.
    func detach(key: PublicKey, id: ObjectIdentifier, slot: Int) {
        let heldUntil = (NIODeadline.now() + self.leaseHold).uptimeNanoseconds
        self.state.withLockedValue { state in
            guard !state.closed else { return }
            state.router.detach(key: key, owner: id, slot: slot, heldUntil: heldUntil)
            state.plainSessions.remove(id)
            self.updateOffload(&state)
        }
    }

    /// Offload on while every client takes offload headers (under the state's lock: attaches and detaches
    /// decide in order).
    private func updateOffload(_ state: inout State) {
        let wanted = state.plainSessions.isEmpty
        guard wanted != state.offloading, self.device.hasOffloadHeaders else { return }
        if self.device.setOffload(wanted) {
            state.offloading = wanted
        } else if wanted {
            self.logger.debug("\(self.device.name): the kernel refused segmentation offload")
        }
    }

    /// The session that owns `destination`.
    func route(to destination: PacketAddress) -> Route? {
        self.state.withLockedValue { $0.router.route(to: destination) }
    }
}

/// Where the packets of one device queue go: each to the session owning its destination, at once when that
/// session runs on this queue's loop, else in one batch per session and read burst.
///
/// Besides NIO's reads on readiness, a session calls its reader's `readBack()` right after writing a
/// client's packets to this queue. Forwarding a packet runs inside the `write(2)`, so when the host answers
/// at once (a ping to a nearby host, a TCP ACK) the reply is often already queued when the write returns;
/// reading it there sends it on without another turn of the event loop (an epoll round and NIO's dispatch)
/// on the round trip.
final class ServerTUNQueue: DevicePacketSink {
    private let tun: ServerTUN
    private let loop: ObjectIdentifier
    /// Packets for sessions on other loops, one batch per session, handed over at the end of the read burst.
    private var batches: [(route: ServerTUN.Route, packets: [ByteBuffer])] = []
    /// Sessions on this loop that got packets in this read burst (flushed at its end). A burst reaches a
    /// handful of sessions at most, so small arrays beat dictionaries here.
    private var local: [TunnelConnectionHandler] = []
    private(set) var unroutable = 0

    /// The device's packets start with their offload header.
    private let offloadHeaders: Bool

    init(tun: ServerTUN, loop: any EventLoop) {
        self.tun = tun
        self.offloadHeaders = tun.device.hasOffloadHeaders
        self.loop = ObjectIdentifier(loop)
    }

    func devicePacket(_ packet: ByteBuffer) {
        let ip = self.offloadHeaders ? packet.skippingOffloadHeader() : packet
        guard let destination = IPPacket.destination(of: ip), let route = self.tun.route(to: destination) else {
            self.unroutable += 1
            return
        }
        if route.loop == self.loop {
            // Queued without a flush of its own: the whole read burst goes out in `deviceBurstFinished`.
            let handler = route.handler.value
            handler.enqueueIPPacket(packet, offloadHeader: self.offloadHeaders)
            if !self.local.contains(where: { $0 === handler }) { self.local.append(handler) }
        } else if let index = self.batches.firstIndex(where: { $0.route.id == route.id }) {
            self.batches[index].packets.append(packet)
        } else {
            self.batches.append((route, [packet]))
        }
    }

    /// Sends what this burst queued: for sessions on this loop now, for the others on their loops.
    func deviceBurstFinished() {
        if !self.local.isEmpty {
            for handler in self.local { handler.flushNow() }
            self.local.removeAll(keepingCapacity: true)
        }
        guard !self.batches.isEmpty else { return }
        let offloadHeaders = self.offloadHeaders
        for (route, packets) in self.batches {
            route.handler.eventLoop.execute {
                let handler = route.handler.value
                for packet in packets { handler.enqueueIPPacket(packet, offloadHeader: offloadHeaders) }
                handler.flushNow()
            }
        }
        self.batches.removeAll(keepingCapacity: true)
    }
}
