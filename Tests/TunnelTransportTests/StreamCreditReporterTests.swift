import Testing

@testable import TunnelTransport

struct StreamCreditReporterTests {
    @Test func creditGoesBackOnlyForBytesTheSocketTook() {
        var credit = StreamCreditReporter()
        credit.receivedAndHanded(100_000)
        // NIO still holds 60 000 of them: 40 000 are written.
        #expect(credit.newlyConsumed(buffered: 60_000) == 40_000)
        #expect(credit.newlyConsumed(buffered: 60_000) == 0, "nothing new")
        credit.receivedAndHanded(10_000)
        #expect(credit.newlyConsumed(buffered: 30_000) == 40_000)
        #expect(credit.newlyConsumed(buffered: 0) == 30_000)
        #expect(credit.reported == 110_000)
    }

    /// The HTTP forwarder re-encodes heads: their bytes are consumed without being written as received, and
    /// a head still being collected is not consumed until the buffer has drained past it.
    @Test func bytesConsumedOtherwiseCountOnceTheirTurnComes() {
        var credit = StreamCreditReporter()
        credit.received(300)  // a response head, collected
        credit.consumedWithoutWrite(300)  // parsed and re-encoded
        credit.received(5000)
        credit.handed(5000)  // body bytes
        #expect(credit.newlyConsumed(buffered: 5000) == 300)
        #expect(credit.newlyConsumed(buffered: 1000) == 4000)
        credit.received(120)  // the start of the next head: not written, not yet consumed
        #expect(credit.newlyConsumed(buffered: 500) == 500)
        // Once the socket drained, all received is accounted for (the head in progress waits on us alone).
        #expect(credit.newlyConsumed(buffered: 0) == 500 + 120)
        #expect(credit.newlyConsumed(buffered: 0) == 0)
    }

    @Test func aNewStreamStartsFromZeroButKeepsAWatchUnderWay() {
        var credit = StreamCreditReporter()
        credit.receivedAndHanded(10)
        credit.watchingDrain = true
        _ = credit.newlyConsumed(buffered: 0)
        credit.reset()
        #expect(credit.received == 0 && credit.reported == 0 && credit.watchingDrain)
        credit.receivedAndHanded(7)
        #expect(credit.newlyConsumed(buffered: 0) == 7)
    }
}
