import LocalProxy
import Logging
import NIOCore
import NIOPosix
import TunnelProtocol
import TunnelRuntime
import TunnelTransport

/// One UDP association on the server: an IPv4 and (where the host has IPv6) an IPv6 socket of its own, from
/// which the client's datagrams go out and whose replies come back through the tunnel tagged with their
/// source. Names are resolved here (the client never does DNS), with a small cache; the deny list applies to
/// every destination. The association ends with its stream, or after `idleTimeout` without traffic.
final class ServerUDPAssociation: MuxStreamContext {
    private let stream: TunnelStream
    private let connector: OutboundConnector
    private let eventLoop: any EventLoop
    private var logger: Logger
    private let idleTimeout: TimeAmount
    private var ipv4: (any Channel)?
    private var ipv6: (any Channel)?
    private var names: [String: (addresses: [SocketAddress], expires: NIODeadline)] = [:]
    /// Datagrams waiting for a name to resolve (bounded per name and in total).
    private var waitingForName: [String: [ByteBuffer]] = [:]
    private var waitingCount = 0
    private var closed = false
    private var lastActivity = NIODeadline.now()
    private var timer: Scheduled<Void>?
    private var tally = DatagramTally()
    /// Datagrams were written and wait for the flush at the end of the tunnel read.
    private var flushPending = false
    /// Addresses this association has sent to (4 or 16 bytes), oldest first: only they may answer (RFC 4787
    /// §5 address-dependent filtering), so a stranger cannot push datagrams through the relay to the client.
    private var contacted: Set<[UInt8]> = []
    private var contactedOrder = CircularBuffer<[UInt8]>(initialCapacity: 8)

    static let maxNames = 256
    static let maxWaiting = 64
    /// Most remembered destinations; the oldest is forgotten beyond this.
    static let maxContacted = 4096

    init(
        stream: TunnelStream,
        eventLoop: any EventLoop,
        connector: OutboundConnector,
        idleTimeout: TimeAmount,
        logger: Logger
    ) {
        self.stream = stream
        self.connector = connector
        self.eventLoop = eventLoop
        self.idleTimeout = idleTimeout
        self.logger = logger
    }

    /// Binds the sockets, then answers the OPEN.
    func start() {
        self.stream.deliverEvents(to: self)
        let reader = NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>(
            { [weak self] in self?.remoteDatagram($0) },
            eventLoop: self.eventLoop
        )
        let wantsMore = NIOLoopBound<() -> Bool>(
            { [weak self] in self?.stream.wantsDatagrams ?? true },
            eventLoop: self.eventLoop
        )
        func bind(_ host: String) -> EventLoopFuture<any Channel> {
            DatagramReader.bind(host: host, port: 0, on: self.eventLoop, receive: reader, wantsMore: wantsMore)
        }
        bind("0.0.0.0").assumeIsolated().whenComplete { result in
            switch result {
            case .success(let channel):
                self.ipv4 = channel
                bind("::").assumeIsolated().whenComplete { v6 in
                    if case .success(let channel) = v6 { self.ipv6 = channel }
                    guard !self.closed, self.stream.isOpening else {
                        self.close()
                        return
                    }
                    self.stream.completeOpen(
                        reply: .succeeded,
                        bound: self.ipv4?.localAddress?.targetAddress ?? .unspecified
                    )
                    self.armIdleTimer()
                }
            case .failure(let error):
                self.logger.info("UDP association: cannot bind a socket: \(error)")
                self.closed = true
                self.stream.completeOpen(reply: .generalFailure, bound: .unspecified)
            }
        }
    }

    private func armIdleTimer() {
        self.timer = self.eventLoop.assumeIsolated().scheduleTask(deadline: self.lastActivity + self.idleTimeout) {
            guard !self.closed else { return }
            if NIODeadline.now() - self.lastActivity >= self.idleTimeout {
                self.close()
            } else {
                self.armIdleTimer()
            }
        }
    }

    private func close() {
        guard !self.closed else { return }
        self.closed = true
        self.timer?.cancel()
        self.tally.logEnd(
            "UDP association \(self.stream.id)",
            sockets: [self.ipv4, self.ipv6].compactMap { $0 },
            logger: self.logger
        )
        self.ipv4?.close(promise: nil)
        self.ipv6?.close(promise: nil)
        self.stream.release()
    }

    // MARK: - From the client (through the tunnel)

    func deliverDatagram(_ payload: ByteBuffer) {
        guard !self.closed, let (target, data) = SOCKS5UDP.split(payload) else {
            self.tally.dropped += 1
            return
        }
        self.lastActivity = .now()
        switch target.host {
        case .ipv4, .ipv6:
            guard let address = target.socketAddress, !self.connector.isDenied(address) else {
                self.tally.dropped += 1
                return
            }
            self.send(data, to: address)
        case .domain(let name):
            let key = "\(name.lowercased())"
            if let cached = self.names[key], cached.expires > .now() {
                guard var address = cached.addresses.first else {
                    self.tally.dropped += 1
                    return
                }
                address.port = Int(target.port)
                self.send(data, to: address)
                return
            }
            guard self.waitingCount < Self.maxWaiting else {
                self.tally.dropped += 1
                return
            }
            self.waitingCount += 1
            if self.waitingForName[key] != nil {
                self.waitingForName[key]!.append(payload)
                return
            }
            self.waitingForName[key] = [payload]
            self.connector.resolveAllowed(target, on: self.eventLoop).assumeIsolated().whenSuccess { addresses in
                let usable = addresses.filter { self.canSend(to: $0) }
                if self.names.count >= Self.maxNames { self.names.removeAll() }
                self.names[key] = (usable, .now() + .seconds(60))
                let queued = self.waitingForName.removeValue(forKey: key) ?? []
                self.waitingCount -= queued.count
                // Outside a tunnel read: the tunnel flushes these after this task (`markNeedsFlush`).
                for payload in queued { self.deliverDatagram(payload) }
            }
        }
    }

    private func canSend(to address: SocketAddress) -> Bool {
        switch address {
        case .v4: return self.ipv4 != nil
        case .v6: return self.ipv6 != nil
        default: return false
        }
    }

    private func send(_ data: ByteBuffer, to address: SocketAddress) {
        let channel: (any Channel)?
        switch address {
        case .v4: channel = self.ipv4
        case .v6: channel = self.ipv6
        default: channel = nil
        }
        guard let channel, channel.isWritable else {
            self.tally.dropped += 1
            return
        }
        self.tally.sent += 1
        if let bytes = address.unmappedBytes, self.contacted.insert(bytes).inserted {
            self.contactedOrder.append(bytes)
            if self.contactedOrder.count > Self.maxContacted, let oldest = self.contactedOrder.popFirst() {
                self.contacted.remove(oldest)
            }
        }
        channel.write(AddressedEnvelope(remoteAddress: address, data: data), promise: nil)
        // One flush after the tunnel read: the datagrams of a burst go out in one sendmmsg.
        if !self.flushPending {
            self.flushPending = true
            self.stream.needsFlush(self)
        }
    }

    // MARK: - From the internet

    func remoteDatagram(_ envelope: AddressedEnvelope<ByteBuffer>) {
        guard !self.closed else { return }
        guard let bytes = envelope.remoteAddress.unmappedBytes, self.contacted.contains(bytes) else {
            self.tally.dropped += 1
            return  // from an address this association never sent to
        }
        self.lastActivity = .now()
        // Tagged with its real source, an IPv4 peer as IPv4 (targetAddress unmaps).
        let source = envelope.remoteAddress.targetAddress
        let payload = SOCKS5UDP.tunnelPayload(from: source, data: envelope.data, allocator: ByteBufferAllocator())
        if self.stream.sendDatagram(payload) {
            self.tally.received += 1
        } else {
            self.tally.dropped += 1
        }
    }

    // MARK: - MuxStreamContext

    func deliver(_ data: ByteBuffer) {}
    func peerFinished() { self.close() }
    func streamClosed(reset: ErrorCode?) { self.close() }
    func readIfWanted() {
        self.ipv4?.read()
        self.ipv6?.read()
    }

    func flushDelivered() {
        self.flushPending = false
        self.ipv4?.flush()
        self.ipv6?.flush()
    }
}

extension TargetAddress {
    /// The address as a socket address (IP literals only).
    var socketAddress: SocketAddress? {
        switch self.host {
        case .ipv4(let a):
            var packed = ByteBuffer()
            packed.writeInteger(a)
            return try? SocketAddress(packedIPAddress: packed, port: Int(self.port))
        case .ipv6(let bytes):
            return try? SocketAddress(packedIPAddress: ByteBuffer(bytes: bytes), port: Int(self.port))
        case .domain:
            return nil
        }
    }
}
