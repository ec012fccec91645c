import NIOCore
import Testing

@testable import ClientRuntime

struct ReconnectPolicyTests {
    let t0 = NIODeadline.uptimeNanoseconds(7_000_000_000_000)

    @Test func failuresBackOffExponentiallyWithJitterUpToTheMaximum() {
        var policy = ReconnectPolicy(maximum: .seconds(30))
        var delays: [TimeAmount] = []
        for _ in 0..<10 { delays.append(policy.failed(jitter: 1.0)) }
        #expect(
            delays.map { $0.nanoseconds / 1_000_000 } == [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        )
        // Jitter takes 50% to 100% of the backoff, never more, never less.
        var other = ReconnectPolicy(maximum: .seconds(30))
        let r1 = other.failed(jitter: 0.5)
        #expect(r1 == .milliseconds(125))
        let r2 = other.failed(jitter: 0.0)
        #expect(r2 == .milliseconds(250), "jitter is clamped to 0.5 ..< 1.0")
        let r3 = other.failed(jitter: 7.0)
        #expect(r3 == .milliseconds(1000))
    }

    @Test func warningsForTheFirstFailureThenEveryTenth() {
        var policy = ReconnectPolicy(maximum: .seconds(30))
        var warnings: [Int] = []
        for n in 1...30 {
            _ = policy.failed(jitter: 1)
            if policy.failureIsWorthAWarning { warnings.append(n) }
        }
        #expect(warnings == [1, 10, 20, 30])
    }

    @Test func aSuccessStartsAfreshUnlessAnotherMachineKeepsTakingTheTunnel() {
        var policy = ReconnectPolicy(maximum: .seconds(30))
        for _ in 0..<5 { _ = policy.failed(jitter: 1) }
        policy.succeeded(now: self.t0)
        #expect(policy.backoff == .milliseconds(250) && policy.consecutiveFailures == 0)
        // Replaced three times in a minute: the count says so, and a success keeps the grown backoff.
        let r4 = policy.replaced(now: self.t0)
        #expect(r4 == 1)
        _ = policy.failed(jitter: 1)
        let r5 = policy.replaced(now: self.t0 + .seconds(10))
        #expect(r5 == 2)
        _ = policy.failed(jitter: 1)
        let r6 = policy.replaced(now: self.t0 + .seconds(20))
        #expect(r6 == 3)
        _ = policy.failed(jitter: 1)
        policy.succeeded(now: self.t0 + .seconds(21))
        #expect(policy.backoff == .seconds(2))
        // A minute later the replacements are forgotten.
        let r7 = policy.replaced(now: self.t0 + .seconds(100))
        #expect(r7 == 1)
        policy.succeeded(now: self.t0 + .seconds(161))
        #expect(policy.backoff == .milliseconds(250))
    }

    @Test func aWaitingUserGetsAnAttemptAtMostOnceASecond() {
        var policy = ReconnectPolicy(maximum: .seconds(30))
        #expect(policy.shouldTryForWaitingUser(now: self.t0))
        policy.attempting(now: self.t0)
        #expect(!policy.shouldTryForWaitingUser(now: self.t0 + .milliseconds(999)))
        #expect(policy.shouldTryForWaitingUser(now: self.t0 + .seconds(1)))
    }
}

struct WaitingQueueTests {
    let t0 = NIODeadline.uptimeNanoseconds(7_000_000_000_000)

    @Test func boundedFirstComeFirstServedAndExpiring() {
        var queue = WaitingQueue<String>(capacity: 3)
        let r8 = queue.append("a", deadline: self.t0 + .seconds(10))
        #expect(r8)
        let r9 = queue.append("b", deadline: self.t0 + .seconds(11))
        #expect(r9)
        let r10 = queue.append("c", deadline: self.t0 + .seconds(12))
        #expect(r10)
        let r11 = queue.append("d", deadline: self.t0 + .seconds(13))
        #expect(!r11, "full: answered at once")
        #expect(queue.nextDeadline == self.t0 + .seconds(10))
        let r12 = queue.expired(now: self.t0 + .seconds(9))
        #expect(r12.isEmpty)
        let r13 = queue.expired(now: self.t0 + .seconds(11))
        #expect(r13 == ["a", "b"])
        #expect(queue.count == 1 && queue.nextDeadline == self.t0 + .seconds(12))
    }

    @Test func aRequestThatCouldNotBeServedKeepsItsPlaceAndDeadline() {
        var queue = WaitingQueue<String>(capacity: 3)
        _ = queue.append("a", deadline: self.t0 + .seconds(10))
        _ = queue.append("b", deadline: self.t0 + .seconds(11))
        let first = queue.popFirstEntry()!
        queue.putBack(first.item, deadline: first.deadline)
        let r14 = queue.popFirst()
        #expect(r14 == "a")
        let r15 = queue.remove(where: { $0 == "b" })
        #expect(r15)
        let r16 = queue.remove(where: { $0 == "b" })
        #expect(!r16)
        #expect(queue.isEmpty && queue.nextDeadline == nil)
    }

    @Test func shutdownAnswersEveryone() {
        var queue = WaitingQueue<Int>(capacity: 10)
        for i in 0..<5 { _ = queue.append(i, deadline: self.t0) }
        let r17 = queue.removeAll()
        #expect(r17 == [0, 1, 2, 3, 4])
        #expect(queue.isEmpty)
    }
}
