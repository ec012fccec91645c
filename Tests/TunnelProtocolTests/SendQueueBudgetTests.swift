import NIOCore
import Testing
import TunnelProtocol

/// The queue below the scheduler: its limit follows the connection's rate, and on a slow link each write is
/// sized to what the kernel may still take.
struct SendQueueBudgetTests {
    let t0 = NIODeadline.uptimeNanoseconds(9_000_000_000_000)

    @Test func theLimitIsWhatTheConnectionSendsInTheTargetDelayWithinItsBounds() {
        var budget = SendQueueBudget()
        #expect(budget.needsMeasurement(now: self.t0))
        // 10 Mbit/s: 4 ms is 5 kB, below the 8 KiB floor; 24 Mbit/s: 12 kB.
        #expect(budget.measured(pacingRate: 1_250_000, now: self.t0) == 8 << 10)
        #expect(budget.measured(pacingRate: 3_000_000, now: self.t0) == 12_000)
        #expect(budget.checksKernelQueue)
        #expect(!budget.needsMeasurement(now: self.t0 + .milliseconds(50)))
        #expect(budget.needsMeasurement(now: self.t0 + .milliseconds(100)))
        // 1 Gbit/s: 500 kB, and the kernel's own check is enough.
        #expect(budget.measured(pacingRate: 125_000_000, now: self.t0 + .milliseconds(100)) == 500_000)
        #expect(!budget.checksKernelQueue)
        #expect(budget.waterMarks == (250_000, 500_000))
        // Loopback: capped.
        #expect(budget.measured(pacingRate: 10_000_000_000, now: self.t0 + .milliseconds(200)) == 2 << 20)
    }

    @Test func smallMovesOfTheRateChangeNothingAndAnUnknownRateKeepsTheLimit() {
        var budget = SendQueueBudget()
        #expect(budget.measured(pacingRate: 12_500_000, now: self.t0) == 50_000)
        #expect(budget.measured(pacingRate: 13_750_000, now: self.t0) == nil, "10% more: not worth a system call")
        #expect(budget.measured(pacingRate: 10_000_000, now: self.t0) == nil, "20% less: not worth one either")
        #expect(budget.measured(pacingRate: 16_000_000, now: self.t0) == 64_000)
        #expect(budget.measured(pacingRate: 0, now: self.t0) == nil)
        #expect(budget.limit == 64_000)
    }

    @Test func smallWritesOnAQuietConnectionAreNotCheckedUntilHalfTheLimitWentOut() {
        var budget = SendQueueBudget()
        _ = budget.measured(pacingRate: 4_096_000, now: self.t0)
        #expect(budget.needsKernelCheck(beforeWriting: 100_000), "bulk is always checked")
        _ = budget.decide(notSent: 0)
        #expect(!budget.needsKernelCheck(beforeWriting: 120), "a ping is not")
        for _ in 0..<60 { budget.wrote(120) }
        #expect(!budget.needsKernelCheck(beforeWriting: 120))
        for _ in 0..<10 { budget.wrote(120) }
        #expect(budget.needsKernelCheck(beforeWriting: 120), "8400 bytes since the last look: look again")
        _ = budget.decide(notSent: 0)
        #expect(!budget.needsKernelCheck(beforeWriting: 120))
        _ = budget.decide(notSent: 9000)
        #expect(budget.needsKernelCheck(beforeWriting: 120), "the kernel was half full at the last look")
        _ = budget.measured(pacingRate: 125_000_000, now: self.t0 + .seconds(1))
        #expect(!budget.needsKernelCheck(beforeWriting: 100_000), "a fast link leaves it to the kernel")
    }

    @Test func eachWriteTakesWhatIsLeftAndAFullQueueWaitsForHalfOfItToGo() {
        var budget = SendQueueBudget()
        _ = budget.measured(pacingRate: 4_096_000, now: self.t0)
        #expect(budget.limit == 16 << 10)
        #expect(budget.decide(notSent: 0) == .write(16 << 10))
        #expect(budget.decide(notSent: 10_000) == .write((16 << 10) - 10_000))
        // Less than a small record's room: wait until the kernel has sent what is above half the limit.
        // 16,384 - 8,192 = 8,192 bytes at 4.096 MB/s: 2 ms.
        #expect(budget.decide(notSent: 16_384) == .wait(.milliseconds(2)))
        // The kernel's last buffer overshot the limit: the wait covers it (57,344 bytes: 14 ms), at most 20 ms.
        #expect(budget.decide(notSent: 65_536) == .wait(.milliseconds(14)))
        #expect(budget.decide(notSent: 1 << 20) == .wait(.milliseconds(20)))
        _ = budget.measured(pacingRate: 50_000_000, now: self.t0 + .seconds(1))
        #expect(budget.decide(notSent: budget.limit) == .wait(.nanoseconds(2_000_000)))
    }
}
