import NIOCore

/// The queue of IP packets waiting for the tunnel in full-tunnel mode (docs/PROTOCOL.md §5): one FIFO per flow
/// and deficit round-robin between them, as the flow queues of fq_codel (RFC 8290 §4) without CoDel.
///
/// A FIFO shared by all flows lets the flows that send most keep it full, so a ping or a DNS query beside eight
/// downloads waits behind the whole queue and is dropped as often as they are. Here each flow (a hash of
/// addresses, protocol and ports into `flowCount` buckets) has its own queue; a flow that just became active
/// is served before the flows that stay busy, and when the queue is full the packet dropped is the oldest of
/// the flow holding most bytes. So a sparse flow sees an almost empty queue, and loss, the congestion signal
/// the tunnelled TCP flows need, falls on those that cause the queue.
struct PacketFairQueue {
    /// One bucket's packets and its round-robin state.
    private struct Flow {
        var packets = CircularBuffer<ByteBuffer>(initialCapacity: 4)
        var bytes = 0
        var deficit = 0
        /// In `newFlows` or `oldFlows`.
        var active = false
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

    init(flowCount: Int = 1024, limitPackets: Int, limitBytes: Int, quantum: Int = 1514, headerBytes: Int = 0) {
        precondition(flowCount > 0 && limitPackets > 0)
        self.flowCount = flowCount
        self.limitPackets = limitPackets
        self.limitBytes = limitBytes
        self.quantum = quantum
        self.headerBytes = headerBytes
        self.flows = Array(repeating: Flow(), count: flowCount)
    }

    var isEmpty: Bool { self.count == 0 }

    /// Queues `packet`; returns how many packets were dropped to make room (0 when it fitted). The packet
    /// itself may be the one dropped (when its own flow is the fattest and nothing else is queued).
    mutating func enqueue(_ packet: ByteBuffer) -> Int {
        let index = Self.flowHash(of: packet, skipping: self.headerBytes) % self.flowCount
        self.flows[index].packets.append(packet)
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

    /// The next packet in fair order, when it is at most `maxBytes` (nil when the queue is empty or the next
    /// packet is larger: it stays first).
    mutating func dequeue(maxBytes: Int) -> ByteBuffer? {
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
            guard let packet = self.flows[index].packets.first else {
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
            guard packet.readableBytes <= maxBytes else { return nil }
            self.flows[index].packets.removeFirst()
            self.flows[index].bytes -= packet.readableBytes
            self.flows[index].deficit -= packet.readableBytes
            self.count -= 1
            self.bytes -= packet.readableBytes
            if self.count == 0 { self.largestQueuedBytes = 0 }
            return packet
        }
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
        guard let packet = self.flows[fattest].packets.popFirst() else { return }
        self.flows[fattest].bytes -= packet.readableBytes
        self.count -= 1
        self.bytes -= packet.readableBytes
        if self.count == 0 { self.largestQueuedBytes = 0 }
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
