import NIOCore
import Testing

@testable import TunnelProtocol

/// An IPv4 packet of `size` bytes from 10.0.0.2:`sourcePort` to 192.0.2.1:`destinationPort` (TCP unless told).
func ipv4Packet(size: Int = 1400, sourcePort: UInt16, destinationPort: UInt16 = 443, proto: UInt8 = 6) -> ByteBuffer {
    var packet = ByteBuffer()
    packet.writeInteger(UInt8(0x45))
    packet.writeInteger(UInt8(0))
    packet.writeInteger(UInt16(size))
    packet.writeInteger(UInt32(0))
    packet.writeInteger(UInt8(64))
    packet.writeInteger(proto)
    packet.writeInteger(UInt16(0))
    packet.writeInteger(UInt32(0x0A00_0002))
    packet.writeInteger(UInt32(0xC000_0201))
    packet.writeInteger(sourcePort)
    packet.writeInteger(destinationPort)
    packet.writeRepeatingByte(0, count: size - packet.readableBytes)
    return packet
}

struct PacketFairQueueTests {
    @Test func aFlowHashesByAddressesProtocolAndPorts() {
        let a = PacketFairQueue.flowHash(of: ipv4Packet(sourcePort: 1000))
        #expect(a == PacketFairQueue.flowHash(of: ipv4Packet(size: 60, sourcePort: 1000)), "size does not matter")
        #expect(a != PacketFairQueue.flowHash(of: ipv4Packet(sourcePort: 1001)))
        #expect(a != PacketFairQueue.flowHash(of: ipv4Packet(sourcePort: 1000, proto: 17)))
        #expect(PacketFairQueue.flowHash(of: ByteBuffer(bytes: [0x00, 1, 2])) == 0, "not IP")
        #expect(PacketFairQueue.flowHash(of: ByteBuffer()) == 0)
        #expect(PacketFairQueue.flowHash(of: ByteBuffer(bytes: [0x45, 0, 0])) == 0, "truncated header")
    }

    @Test func aSparseFlowIsServedBeforeTheQueueOfABusyOne() {
        var queue = PacketFairQueue(limitPackets: 1000, limitBytes: 10 << 20)
        for _ in 0..<300 { #expect(queue.enqueue(ipv4Packet(sourcePort: 1000)) == 0) }
        _ = queue.dequeue(maxBytes: .max)
        let ping = ipv4Packet(size: 84, sourcePort: 7, proto: 1)
        #expect(queue.enqueue(ping) == 0)
        // The busy flow finishes the turn it is in at most (one quantum), then the new flow goes.
        var position = 0
        while let packet = queue.dequeue(maxBytes: .max) {
            position += 1
            if packet.readableBytes == 84 { break }
        }
        #expect(position <= 2, "the ping waited behind \(position - 1) packets, not 299")
    }

    @Test func aFullQueueDropsFromTheFlowHoldingMostBytes() {
        var queue = PacketFairQueue(limitPackets: 100, limitBytes: 10 << 20)
        for _ in 0..<70 { _ = queue.enqueue(ipv4Packet(sourcePort: 1000)) }
        for _ in 0..<30 { _ = queue.enqueue(ipv4Packet(sourcePort: 2000)) }
        #expect(queue.count == 100)
        #expect(queue.enqueue(ipv4Packet(size: 84, sourcePort: 7, proto: 1)) == 1)
        #expect(queue.count == 100)
        var perFlow: [Int: Int] = [:]
        var sawPing = false
        while let packet = queue.dequeue(maxBytes: .max) {
            if packet.readableBytes == 84 { sawPing = true }
            perFlow[Int(packet.getInteger(at: 20, as: UInt16.self)!), default: 0] += 1
        }
        #expect(sawPing, "the ping was not the one dropped")
        #expect(perFlow[1000] == 69 && perFlow[2000] == 30)
    }

    @Test func aByteLimitDropsToo() {
        var queue = PacketFairQueue(limitPackets: 1000, limitBytes: 14_000)
        var dropped = 0
        for _ in 0..<20 { dropped += queue.enqueue(ipv4Packet(sourcePort: 1000)) }
        #expect(dropped == 10 && queue.bytes == 14_000)
    }

    @Test func busyFlowsShareByBytes() {
        var queue = PacketFairQueue(limitPackets: 1000, limitBytes: 10 << 20)
        for _ in 0..<200 {
            _ = queue.enqueue(ipv4Packet(size: 1400, sourcePort: 1000))
            _ = queue.enqueue(ipv4Packet(size: 700, sourcePort: 2000))
            _ = queue.enqueue(ipv4Packet(size: 700, sourcePort: 2000))
        }
        var bytes: [Int: Int] = [:]
        for _ in 0..<200 {
            let packet = queue.dequeue(maxBytes: .max)!
            bytes[Int(packet.getInteger(at: 20, as: UInt16.self)!), default: 0] += packet.readableBytes
        }
        let a = bytes[1000]!
        let b = bytes[2000]!
        #expect(abs(a - b) <= 1514 * 2, "\(a) vs \(b)")
    }

    @Test func aPacketLargerThanTheRoomLeftStaysFirst() {
        var queue = PacketFairQueue(limitPackets: 10, limitBytes: 1 << 20)
        _ = queue.enqueue(ipv4Packet(size: 1400, sourcePort: 1000))
        _ = queue.enqueue(ipv4Packet(size: 100, sourcePort: 1000))
        #expect(queue.largestQueuedBytes == 1400)
        #expect(queue.dequeue(maxBytes: 1000) == nil)
        #expect(queue.dequeue(maxBytes: 1400)?.readableBytes == 1400)
        #expect(queue.dequeue(maxBytes: 100)?.readableBytes == 100)
        #expect(queue.isEmpty && queue.largestQueuedBytes == 0)
        #expect(queue.dequeue(maxBytes: .max) == nil)
    }

    @Test func aFlowThatSendsOnePacketPerRoundDoesNotStayNew() {
        // RFC 8290 §4.2: a flow that ran dry while new goes through the old list, so alternating one packet at
        // a time cannot keep it ahead of everyone forever.
        var queue = PacketFairQueue(limitPackets: 1000, limitBytes: 10 << 20)
        for _ in 0..<50 { _ = queue.enqueue(ipv4Packet(sourcePort: 1000)) }
        var served: [UInt16] = []
        for _ in 0..<10 {
            _ = queue.enqueue(ipv4Packet(sourcePort: 3000))
            for _ in 0..<2 {
                if let packet = queue.dequeue(maxBytes: .max) {
                    served.append(packet.getInteger(at: 20, as: UInt16.self)!)
                }
            }
        }
        #expect(served.filter { $0 == 1000 }.count >= 8, "the busy flow still gets its turns: \(served)")
    }

    // MARK: - CoDel (RFC 8289) on each flow

    static let ms: UInt64 = 1_000_000

    /// A bulk flow that fills its queue faster than it is served: `arrivals` packets per `step` ms while one
    /// is dequeued per `step` ms, from `start` for `duration` ms. Returns the times (ms) of the CoDel drops.
    static func run(
        _ queue: inout PacketFairQueue,
        from start: UInt64,
        for duration: UInt64,
        arrivals: Int,
        port: UInt16 = 1000
    ) -> [UInt64] {
        var drops: [UInt64] = []
        for t in start..<(start + duration) {
            for _ in 0..<arrivals { _ = queue.enqueue(ipv4Packet(sourcePort: port), now: t * ms) }
            let before = queue.delayDrops
            _ = queue.dequeue(maxBytes: .max, now: t * ms)
            if queue.delayDrops > before { drops += Array(repeating: t, count: queue.delayDrops - before) }
        }
        return drops
    }

    @Test func aFlowWhoseWaitStaysOverTheTargetForAnIntervalLosesItsHeadAndThenMoreOften() {
        var queue = PacketFairQueue(limitPackets: 100_000, limitBytes: 1 << 30)
        // Two arrive per millisecond, one leaves: the wait grows by half a millisecond each millisecond, and
        // passes 5 ms at about 10 ms. The first drop comes one interval (100 ms) later, the next ones
        // 100 / sqrt(count) ms apart (the control law).
        let drops = Self.run(&queue, from: 1, for: 400, arrivals: 2)
        #expect(drops.first.map { (105...115).contains($0) } == true, "\(drops)")
        #expect(drops.count >= 4, "\(drops)")
        let gaps = zip(drops.dropFirst(), drops).map { $0 - $1 }
        #expect(Array(gaps.prefix(3)) == [100, 71, 58], "100 / sqrt(1), / sqrt(2), / sqrt(3) ms: \(drops)")
        #expect(zip(gaps.dropFirst(), gaps).allSatisfy { $0 <= $1 }, "ever closer: \(gaps)")
    }

    @Test func aQueueThatDrainsWithinTheTargetIsNeverDroppedFrom() {
        var queue = PacketFairQueue(limitPackets: 100_000, limitBytes: 1 << 30)
        // A burst of 4 packets every 4 ms, served one per ms: each waits at most 3 ms.
        var drops = 0
        for t in UInt64(1)...2000 {
            if t % 4 == 0 { for _ in 0..<4 { _ = queue.enqueue(ipv4Packet(sourcePort: 1000), now: t * Self.ms) } }
            _ = queue.dequeue(maxBytes: .max, now: t * Self.ms)
            drops = queue.delayDrops
        }
        #expect(drops == 0)
    }

    @Test func droppingStopsOnceTheWaitIsUnderTheTargetAgain() {
        var queue = PacketFairQueue(limitPackets: 100_000, limitBytes: 1 << 30)
        let first = Self.run(&queue, from: 1, for: 300, arrivals: 2)
        #expect(!first.isEmpty)
        // Now nothing arrives: the backlog drains (and is dropped from, while its wait is still long) until
        // the queue is empty; then a flow that arrives at the rate it is served is left alone.
        while queue.dequeue(maxBytes: .max, now: 300 * Self.ms) != nil {}
        let drops = queue.delayDrops
        _ = Self.run(&queue, from: 301, for: 500, arrivals: 1)
        #expect(queue.delayDrops == drops)
    }

    @Test func aSparseFlowBesideADroppedBulkFlowLosesNothing() {
        var queue = PacketFairQueue(limitPackets: 100_000, limitBytes: 1 << 30)
        var pings = 0
        for t in UInt64(1)...600 {
            _ = queue.enqueue(ipv4Packet(sourcePort: 1000), now: t * Self.ms)
            _ = queue.enqueue(ipv4Packet(sourcePort: 1000), now: t * Self.ms)
            if t % 10 == 0 { _ = queue.enqueue(ipv4Packet(size: 84, sourcePort: 7, proto: 1), now: t * Self.ms) }
            while let packet = queue.dequeue(maxBytes: .max, now: t * Self.ms) {
                if packet.readableBytes == 84 {
                    pings += 1
                } else {
                    break
                }
            }
        }
        #expect(queue.delayDrops > 0, "the bulk flow was dropped from")
        #expect(pings == 60, "every ping went out")
    }

    @Test func aPacketThatNoLongerFitsAfterADropGoesBackFirst() {
        var queue = PacketFairQueue(limitPackets: 100_000, limitBytes: 1 << 30)
        _ = Self.run(&queue, from: 1, for: 120, arrivals: 2)
        #expect(queue.delayDrops >= 1)
        // The flow is in its dropping state: a large packet at the head is dropped, the next one is large too and
        // does not fit the room given, so it stays queued, first.
        let countBefore = queue.count
        let bytesBefore = queue.bytes
        let dropsBefore = queue.delayDrops
        var t: UInt64 = 121
        var result: ByteBuffer? = ByteBuffer()
        while queue.delayDrops == dropsBefore && t < 1000 {
            result = queue.dequeue(maxBytes: 1400, now: t * Self.ms)
            if queue.delayDrops == dropsBefore { #expect(result != nil) }
            t += 1
        }
        #expect(queue.delayDrops == dropsBefore + 1)
        #expect(queue.count <= countBefore && queue.bytes <= bytesBefore)
        #expect(queue.largestQueuedBytes >= 1400, "the packet put back still counts for the room a record needs")
        let later = queue.dequeue(maxBytes: .max, now: t * Self.ms)
        #expect(later?.readableBytes == 1400)
    }
}
