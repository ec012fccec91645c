import NIOCore

/// The queue of IP packets waiting for the tunnel in full-tunnel mode (docs/PROTOCOL.md §5): one FIFO per flow
/// and deficit round-robin between them, with CoDel on each flow, as fq_codel (RFC 8290).
///
/// A FIFO shared by all flows lets the flows that send most keep it full, so a ping or a DNS query beside eight
/// downloads waits behind the whole queue and is dropped as often as they are. Here each flow (a hash of
/// addresses, protocol and ports into `flowCount` buckets) has its own queue; a flow that just became active
/// is served before the flows that stay busy, and when the queue is full the packet dropped is the oldest of
/// the flow holding most bytes. So a sparse flow sees an almost empty queue, and loss, the congestion signal
/// the tunnelled TCP flows need, falls on those that cause the queue.
///
/// The limit alone would let a bulk flow keep its own FIFO full: with 4 MiB, over a second at 20 Mbit/s of delay
/// for every packet of that flow (an HTTP/2 connection's small responses behind its own download). So each
/// flow also runs CoDel (RFC 8289): once its packets have waited more than `target` for a whole `interval`,
/// it drops one at the head, then more often (interval / sqrt(count)) until the wait falls under the target.
/// One drop per round trip is enough for a TCP sender to halve its window, so the flow's queue settles at a
/// few milliseconds with far fewer drops than a full queue makes.
struct PacketFairQueue {
    /// A queued packet and when it was queued (nanoseconds of a monotonic clock).
    private struct Entry {
        var packet: ByteBuffer
        var enqueued: UInt64
    }

    /// One bucket's packets, its round-robin state and its CoDel state (RFC 8289 §5).
    private struct Flow {
        var packets = CircularBuffer<Entry>(initialCapacity: 4)
        var bytes = 0
        var deficit = 0
        /// In `newFlows` or `oldFlows`.
        var active = false
        /// When the head's wait went above the target plus one interval; 0: the wait is under the target.
        var firstAboveTime: UInt64 = 0
        /// When the next drop is due while `dropping`.
        var dropNext: UInt64 = 0
        /// Drops in this dropping spell (sets the drop rate), and in the previous one.
        var count: UInt32 = 0
        var lastCount: UInt32 = 0
        var dropping = false
    }

    /// CoDel's parameters (RFC 8289 §4.2 and §4.3: 5 ms and 100 ms, the values for paths up to about 100 ms).
    struct CoDelParameters {
        var target: UInt64 = 5_000_000
        var interval: UInt64 = 100_000_000
    }

    let flowCount: Int
    let limitPackets: Int
    let limitBytes: Int
    /// Bytes a flow may send per round.
    let quantum: Int
    /// Bytes in front of each packet's IP header (an offload header), skipped when hashing its flow.
    let headerBytes: Int
    private var flows: [Flow]
    /// Flows that became active since they last ran dry: served first (RFC 8290 §4.2, the new-flows list).
    private var newFlows = CircularBuffer<Int>(initialCapacity: 8)
    private var oldFlows = CircularBuffer<Int>(initialCapacity: 8)
    private(set) var count = 0
    private(set) var bytes = 0
    let codel: CoDelParameters
    /// Packets CoDel dropped for waiting too long (the full queue's drops are `enqueue`'s result).
    private(set) var delayDrops = 0

    init(
        flowCount: Int = 1024,
        limitPackets: Int,
        limitBytes: Int,
        quantum: Int = 1514,
        headerBytes: Int = 0,
        codel: CoDelParameters = CoDelParameters()
    ) {
        precondition(flowCount > 0 && limitPackets > 0)
        self.flowCount = flowCount
        self.limitPackets = limitPackets
        self.limitBytes = limitBytes
        self.quantum = quantum
        self.headerBytes = headerBytes
        self.codel = codel
        self.flows = Array(repeating: Flow(), count: flowCount)
    }

    var isEmpty: Bool { self.count == 0 }

    /// Queues `packet` at `now` (nanoseconds, monotonic); returns how many packets were dropped to make room
    /// (0 when it fitted). The packet itself may be the one dropped (when its own flow is the fattest and
    /// nothing else is queued).
    mutating func enqueue(_ packet: ByteBuffer, now: UInt64 = 0) -> Int {
        let index = Self.flowHash(of: packet, skipping: self.headerBytes) % self.flowCount
        self.flows[index].packets.append(Entry(packet: packet, enqueued: now))
        self.flows[index].bytes += packet.readableBytes
        self.count += 1
        self.bytes += packet.readableBytes
        self.largestQueuedBytes = max(self.largestQueuedBytes, packet.readableBytes)
        if !self.flows[index].active {
            self.flows[index].active = true
            self.flows[index].deficit = self.quantum
            self.newFlows.append(index)
        }
        var dropped = 0
        while self.count > self.limitPackets || self.bytes > self.limitBytes {
            self.dropFromFattestFlow()
            dropped += 1
        }
        return dropped
    }

    /// The next packet in fair order at `now` (nanoseconds, the clock of `enqueue`), when it is at most
    /// `maxBytes` (nil when the queue is empty or the next packet is larger: it stays first). CoDel may drop
    /// packets of the flow whose turn it is on the way (`delayDrops`).
    mutating func dequeue(maxBytes: Int, now: UInt64 = 0) -> ByteBuffer? {
        while true {
            let fromNew = !self.newFlows.isEmpty
            guard let index = fromNew ? self.newFlows.first : self.oldFlows.first else { return nil }
            if self.flows[index].deficit <= 0 {
                // Its turn is over: to the back of the old flows with a new quantum.
                self.flows[index].deficit += self.quantum
                self.removeFirst(fromNew: fromNew)
                self.oldFlows.append(index)
                continue
            }
            guard !self.flows[index].packets.isEmpty else {
                // Ran dry. A new flow goes through the old list once more (RFC 8290 §4.2: else a flow that
                // sends one packet per round would always count as new); an old one leaves.
                self.removeFirst(fromNew: fromNew)
                if fromNew && !self.oldFlows.isEmpty {
                    self.oldFlows.append(index)
                } else {
                    self.flows[index].active = false
                }
                continue
            }
            switch self.codelDequeue(index, maxBytes: maxBytes, now: now) {
            case .packet(let packet):
                self.flows[index].deficit -= packet.readableBytes
                return packet
            case .ranDry:
                continue
            case .tooLarge:
                return nil
            }
        }
    }

    private enum CoDelOutcome {
        case packet(ByteBuffer)
        /// The flow has nothing left (CoDel may have dropped its last packets).
        case ranDry
        /// The flow's head is larger than the room given: it stays first.
        case tooLarge
    }

    /// Whether the head of the flow, if it left now, has waited long enough to be dropped (RFC 8289 §5.6,
    /// dodequeue, decided before the packet is taken off so that one that does not fit can stay first). A flow
    /// holding no more than one full-size packet besides its head is never dropped from.
    private mutating func okToDrop(_ index: Int, head: Entry, now: UInt64) -> Bool {
        let sojourn = now &- head.enqueued
        if now < head.enqueued || sojourn < self.codel.target
            || self.flows[index].bytes - head.packet.readableBytes <= self.quantum
        {
            self.flows[index].firstAboveTime = 0
            return false
        }
        if self.flows[index].firstAboveTime == 0 {
            self.flows[index].firstAboveTime = now + self.codel.interval
            return false
        }
        return now >= self.flows[index].firstAboveTime
    }

    /// The flow's next packet after CoDel's drops (RFC 8289 §5.7), if it fits `maxBytes`.
    private mutating func codelDequeue(_ index: Int, maxBytes: Int, now: UInt64) -> CoDelOutcome {
        guard var head = self.flows[index].packets.first else {
            self.flows[index].firstAboveTime = 0
            self.flows[index].dropping = false
            return .ranDry
        }
        guard head.packet.readableBytes <= maxBytes else { return .tooLarge }
        let okToDrop = self.okToDrop(index, head: head, now: now)
        if self.flows[index].dropping {
            if !okToDrop { self.flows[index].dropping = false }
            while self.flows[index].dropping && now >= self.flows[index].dropNext {
                self.removeHead(of: index)
                self.delayDrops += 1
                self.flows[index].count &+= 1
                guard let next = self.flows[index].packets.first else {
                    self.flows[index].firstAboveTime = 0
                    self.flows[index].dropping = false
                    return .ranDry
                }
                head = next
                if self.okToDrop(index, head: head, now: now) {
                    self.flows[index].dropNext = self.controlLaw(self.flows[index].dropNext, self.flows[index].count)
                } else {
                    self.flows[index].dropping = false
                }
                guard head.packet.readableBytes <= maxBytes else { return .tooLarge }
            }
        } else if okToDrop {
            self.removeHead(of: index)
            self.delayDrops += 1
            let flow = self.flows[index]
            self.flows[index].dropping = true
            // Back to a drop rate near the last spell's if that ended recently (RFC 8289 §5.7).
            let delta = flow.count &- flow.lastCount
            var count: UInt32 = 1
            if delta > 1 && flow.count > flow.lastCount && now &- flow.dropNext < 16 * self.codel.interval {
                count = delta
            }
            self.flows[index].count = count
            self.flows[index].lastCount = count
            self.flows[index].dropNext = self.controlLaw(now, count)
            guard let next = self.flows[index].packets.first else {
                self.flows[index].firstAboveTime = 0
                return .ranDry
            }
            head = next
            _ = self.okToDrop(index, head: head, now: now)
            guard head.packet.readableBytes <= maxBytes else { return .tooLarge }
        }
        self.removeHead(of: index)
        return .packet(head.packet)
    }

    /// Takes the head of a flow off the queue, keeping the counts.
    private mutating func removeHead(of index: Int) {
        guard let entry = self.flows[index].packets.popFirst() else { return }
        let size = entry.packet.readableBytes
        self.flows[index].bytes -= size
        self.count -= 1
        self.bytes -= size
        if self.count == 0 { self.largestQueuedBytes = 0 }
    }

    /// When the next drop is due: `interval / sqrt(count)` after `time`.
    private func controlLaw(_ time: UInt64, _ count: UInt32) -> UInt64 {
        time + UInt64(Double(self.codel.interval) / Double(max(count, 1)).squareRoot())
    }

    /// At least the size of the packet `dequeue` returns next (the largest packet queued since the queue was
    /// last empty): a record with this much room takes the next packet, whichever flow it comes from.
    private(set) var largestQueuedBytes = 0

    private mutating func removeFirst(fromNew: Bool) {
        if fromNew {
            self.newFlows.removeFirst()
        } else {
            self.oldFlows.removeFirst()
        }
    }

    /// Drops the oldest packet of the flow holding most bytes (RFC 8290 §4.1). Only a flow in one of the two
    /// lists can hold bytes, so it scans those (a few busy flows) and not every bucket; it runs only when the
    /// queue overflows.
    private mutating func dropFromFattestFlow() {
        var fattest = self.newFlows.first ?? self.oldFlows.first ?? 0
        for index in self.newFlows where self.flows[index].bytes > self.flows[fattest].bytes { fattest = index }
        for index in self.oldFlows where self.flows[index].bytes > self.flows[fattest].bytes { fattest = index }
        self.removeHead(of: fattest)
    }

    /// A hash of the packet's flow: addresses, protocol and (for TCP, UDP and SCTP over IPv4 without options
    /// beyond the header length, and IPv6 without extension headers) ports. Reads a few words, never loops over
    /// the bytes; a packet too short or not IP hashes to 0.
    static func flowHash(of packet: ByteBuffer, skipping headerBytes: Int = 0) -> Int {
        let start = packet.readerIndex + headerBytes
        guard let first = packet.getInteger(at: start, as: UInt8.self) else { return 0 }
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ value: UInt64) {
            hash = (hash ^ value) &* 0x0000_0100_0000_01b3
            hash ^= hash >> 29
        }
        let protocolNumber: UInt8?
        let transport: Int
        switch first >> 4 {
        case 4:
            let headerLength = Int(first & 0x0F) * 4
            guard headerLength >= 20, packet.writerIndex - start >= headerLength,
                let addresses = packet.getInteger(at: start + 12, as: UInt64.self)
            else { return 0 }
            mix(addresses)
            protocolNumber = packet.getInteger(at: start + 9, as: UInt8.self)
            transport = start + headerLength
        case 6:
            guard packet.writerIndex - start >= 40,
                let a = packet.getInteger(at: start + 8, as: UInt64.self),
                let b = packet.getInteger(at: start + 16, as: UInt64.self),
                let c = packet.getInteger(at: start + 24, as: UInt64.self),
                let d = packet.getInteger(at: start + 32, as: UInt64.self)
            else { return 0 }
            mix(a)
            mix(b)
            mix(c)
            mix(d)
            protocolNumber = packet.getInteger(at: start + 6, as: UInt8.self)
            transport = start + 40
        default:
            return 0
        }
        if let protocolNumber {
            mix(UInt64(protocolNumber))
            if protocolNumber == 6 || protocolNumber == 17 || protocolNumber == 132,
                let ports = packet.getInteger(at: transport, as: UInt32.self)
            {
                mix(UInt64(ports))
            }
        }
        return Int(truncatingIfNeeded: hash >> 1)
    }
}
