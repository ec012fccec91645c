import NIOCore
import Testing

@testable import TunnelProtocol

/// The sender's priority classes: `StreamScheduler` alone, then inside the multiplexer's records.
struct StreamSchedulerTests {
    let policy = StreamScheduler.Policy(burst: 64 << 10, refillPerSecond: 64 << 10, bulkTurnAfter: 128 << 10)
    let start = NIODeadline.uptimeNanoseconds(5_000_000_000)

    func makeStream(_ id: UInt32) -> MuxStream {
        MuxStream(
            id: StreamID(id),
            target: TargetAddress(host: .domain("example.com"), port: 80),
            receiveWindow: ReceiveWindow(target: 1 << 20)
        )
    }

    /// A scheduler whose stream `bulk` has spent its allowance (and is queued), plus admitted streams `ids`.
    func schedulerWithBulk(_ ids: [UInt32]) -> (StreamScheduler, MuxStream, [MuxStream]) {
        var scheduler = StreamScheduler(policy: self.policy)
        let bulk = self.makeStream(1)
        scheduler.admit(bulk, now: self.start)
        scheduler.append(bulk, now: self.start)
        #expect(scheduler.next() === bulk)
        scheduler.sent(64 << 10, by: bulk)
        scheduler.append(bulk, now: self.start)
        let others = ids.map { id in
            let stream = self.makeStream(id)
            scheduler.admit(stream, now: self.start)
            scheduler.append(stream, now: self.start)
            return stream
        }
        return (scheduler, bulk, others)
    }

    @Test func aNewStreamGoesBeforeAStreamThatSpentItsAllowance() {
        var (scheduler, bulk, others) = self.schedulerWithBulk([3])
        #expect(bulk.bulkClass)
        #expect(scheduler.bulkCount == 1 && scheduler.interactiveCount == 1)
        #expect(scheduler.next() === others[0], "the bulk stream was queued first, the new one goes first")
        scheduler.sent(1000, by: others[0])
        #expect(scheduler.next() === bulk)
        #expect(scheduler.next() == nil)
    }

    @Test func interactiveStreamsShareRoundRobinAmongThemselves() {
        var (scheduler, _, others) = self.schedulerWithBulk([3, 5, 7])
        var order: [UInt32] = []
        for _ in 0..<6 {
            let stream = scheduler.next()!
            order.append(stream.id.rawValue)
            if stream.bulkClass { break }
            scheduler.sent(4 << 10, by: stream)
            scheduler.append(stream, now: self.start)
        }
        #expect(order == [3, 5, 7, 3, 5, 7])
        #expect(others.allSatisfy { !$0.bulkClass })
    }

    @Test func aStreamTurnsBulkOnceItSpendsItsBurst() {
        var scheduler = StreamScheduler(policy: self.policy)
        let stream = self.makeStream(1)
        scheduler.admit(stream, now: self.start)
        var sent = 0
        while !stream.bulkClass {
            scheduler.append(stream, now: self.start)
            guard !stream.bulkClass else { break }
            #expect(scheduler.next() === stream)
            scheduler.sent(16 << 10, by: stream)
            sent += 16 << 10
        }
        #expect(sent == 64 << 10, "interactive for exactly its burst")
        #expect(scheduler.next() === stream, "alone, a bulk stream is served at once")
    }

    @Test func bulkGetsATurnAfterBulkTurnAfterInteractiveBytes() {
        // New streams that never stop coming (a page of many objects) still leave bulk its share.
        var (scheduler, bulk, _) = self.schedulerWithBulk([])
        var nextID: UInt32 = 3
        var interactiveBytes = 0
        var bulkTurns = 0
        for _ in 0..<200 {
            while scheduler.interactiveCount < 4 {
                let stream = self.makeStream(nextID)
                nextID += 2
                scheduler.admit(stream, now: self.start)
                scheduler.append(stream, now: self.start)
            }
            let stream = scheduler.next()!
            scheduler.sent(16 << 10, by: stream)
            if stream === bulk {
                bulkTurns += 1
                #expect(interactiveBytes >= 128 << 10, "bulk's turn comes after its share of interactive bytes")
                interactiveBytes = 0
                scheduler.append(bulk, now: self.start)
            } else {
                interactiveBytes += 16 << 10  // each object is 16 KiB: its stream ends after one turn
            }
        }
        // 200 turns of 16 KiB: bulk gets one in every 9.
        #expect(bulkTurns == 200 / 9)
    }

    @Test func bulkTurnsKeepADownloadInDebt() {
        var (scheduler, bulk, _) = self.schedulerWithBulk([])
        for _ in 0..<10 {
            #expect(scheduler.next() === bulk)
            scheduler.sent(16 << 10, by: bulk)
            scheduler.append(bulk, now: self.start)
        }
        #expect(bulk.interactiveAllowance == -(64 << 10), "debt is bounded by one burst")
        // Sending on as fast as 100 ms refills keeps it bulk.
        _ = scheduler.next()
        scheduler.sent(6 << 10, by: bulk)
        scheduler.append(bulk, now: self.start + .milliseconds(100))
        #expect(bulk.bulkClass)
    }

    @Test func aQuietStreamBecomesInteractiveAgainAsItsAllowanceRefills() {
        var (scheduler, bulk, _) = self.schedulerWithBulk([])
        #expect(scheduler.next() === bulk)
        // 100 ms refills 6.4 KiB: still in debt after a 64 KiB burst plus one more turn.
        scheduler.sent(16 << 10, by: bulk)
        scheduler.append(bulk, now: self.start + .milliseconds(100))
        #expect(bulk.bulkClass)
        _ = scheduler.next()
        // Quiet for 1.5 s: the bucket is full again.
        scheduler.append(bulk, now: self.start + .milliseconds(1600))
        #expect(!bulk.bulkClass)
        #expect(bulk.interactiveAllowance == 64 << 10)
    }

    @Test func frequentAppendsStillRefill() {
        // Calls a microsecond apart each refill less than a byte; the time must not be lost.
        var (scheduler, bulk, _) = self.schedulerWithBulk([])
        _ = scheduler.next()
        let before = bulk.interactiveAllowance
        var now = self.start
        for _ in 0..<100_000 {
            now = now + .microseconds(1)
            scheduler.append(bulk, now: now)
            _ = scheduler.next()
        }
        // 100 ms at 64 KiB/s is 6554 bytes; calls 16 us apart keep all but the fractions of a byte.
        #expect(bulk.interactiveAllowance - before >= 6000)
    }

    @Test func aClockThatGoesBackwardsRefillsNothing() {
        var (scheduler, bulk, _) = self.schedulerWithBulk([])
        _ = scheduler.next()
        let before = bulk.interactiveAllowance
        scheduler.append(bulk, now: self.start - .seconds(30))
        #expect(bulk.interactiveAllowance == before)
        #expect(bulk.bulkClass)
    }

    @Test func aPutBackStreamKeepsItsPlaceInItsClass() {
        var (scheduler, bulk, others) = self.schedulerWithBulk([3, 5])
        let first = scheduler.next()!
        #expect(first === others[0])
        scheduler.putBack(first)
        #expect(scheduler.next() === others[0])
        #expect(scheduler.next() === others[1])
        #expect(scheduler.next() === bulk)
        scheduler.putBack(bulk)
        #expect(scheduler.next() === bulk)
    }

    // MARK: - In the multiplexer

    /// Data frames of the next records: (stream id, bytes) in wire order, merged per consecutive frame.
    func dataOrder(_ mux: Multiplexer, records: Int, limit: Int, now: NIODeadline) throws -> [(UInt32, Int)] {
        var order: [(UInt32, Int)] = []
        for _ in 0..<records {
            var record = ByteBuffer()
            guard mux.produceRecord(into: &record, limit: limit, now: now) else { break }
            while let frame = try record.readFrame() {
                guard frame.header.type == .data else { continue }
                let id = frame.header.streamID.rawValue
                if let last = order.last, last.0 == id {
                    order[order.count - 1].1 += frame.payload.readableBytes
                } else {
                    order.append((id, frame.payload.readableBytes))
                }
            }
        }
        return order
    }

    @Test func aSmallResponseOvertakesADownloadInTheNextRecord() throws {
        let pair = MuxPair()
        let (_, download) = try pair.openAccepted()
        // The download has sent past its burst and has 200 KiB more waiting.
        pair.server.localRead(bytes(200 << 10), on: download)
        _ = try self.dataOrder(pair.server, records: 3, limit: 64 << 10, now: pair.now)
        try pair.pump()
        pair.server.localRead(bytes(200 << 10), on: download)
        let (_, page) = try pair.openAccepted()
        pair.server.localRead(bytes(24 << 10), on: page)
        let order = try self.dataOrder(pair.server, records: 2, limit: 16 << 10, now: pair.now)
        #expect(order.first?.0 == page.id.rawValue, "the page's bytes go first: \(order)")
        let pageBytes = order.prefix { $0.0 == page.id.rawValue }.reduce(0) { $0 + $1.1 }
        #expect(pageBytes == 24 << 10, "all of it before the download resumes: \(order)")
    }

    @Test func withoutADownloadBesideItALongStreamIsNotHeldBack() throws {
        let pair = MuxPair()
        let (_, download) = try pair.openAccepted()
        pair.server.localRead(bytes(600 << 10), on: download)
        let order = try self.dataOrder(pair.server, records: 20, limit: 64 << 10, now: pair.now)
        // One stream, one merged run: every record full of it, past the burst too.
        #expect(order.count == 1 && order[0].1 >= 600 << 10 - 64 << 10)
    }

    @Test func windowUpdatesGoAheadOfADownloadsData() throws {
        // The receiving side of an interactive stream: its window update is never behind bulk data.
        let pair = MuxPair()
        let (clientStream, serverStream) = try pair.openAccepted()
        let (_, download) = try pair.openAccepted()
        pair.server.localRead(bytes(600 << 10), on: download)
        // The client consumed what the server sent it on the other stream: an update is owed at once.
        pair.client.localRead(bytes(1 << 20), on: clientStream)
        for var record in MuxPair.produce(pair.client, now: pair.now) {
            _ = try pair.server.receivedRecord(&record, now: pair.now)
        }
        pair.server.consumed(1 << 20, on: serverStream, now: pair.now)
        var record = ByteBuffer()
        #expect(pair.server.produceRecord(into: &record, limit: 16 << 10, now: pair.now))
        let first = try #require(try record.readFrame())
        #expect(first.header.type == .windowUpdate && first.header.streamID == serverStream.id)
    }
}
