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
        let atHalf = other.failed(jitter: 0.5)
        #expect(atHalf == .milliseconds(125))
        let belowRange = other.failed(jitter: 0.0)
        #expect(belowRange == .milliseconds(250), "jitter is clamped to 0.5 ..< 1.0")
        let aboveRange = other.failed(jitter: 7.0)
        #expect(aboveRange == .milliseconds(1000))
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
        let once = policy.replaced(now: self.t0)
        #expect(once == 1)
        _ = policy.failed(jitter: 1)
        let twice = policy.replaced(now: self.t0 + .seconds(10))
        #expect(twice == 2)
        _ = policy.failed(jitter: 1)
        let thrice = policy.replaced(now: self.t0 + .seconds(20))
        #expect(thrice == 3)
        _ = policy.failed(jitter: 1)
        policy.succeeded(now: self.t0 + .seconds(21))
        #expect(policy.backoff == .seconds(2))
        // A minute later the replacements are forgotten.
        let afresh = policy.replaced(now: self.t0 + .seconds(100))
        #expect(afresh == 1)
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
        let tookA = queue.append("a", deadline: self.t0 + .seconds(10))
        #expect(tookA)
        let tookB = queue.append("b", deadline: self.t0 + .seconds(11))
        #expect(tookB)
        let tookC = queue.append("c", deadline: self.t0 + .seconds(12))
        #expect(tookC)
        let tookD = queue.append("d", deadline: self.t0 + .seconds(13))
        #expect(!tookD, "full: answered at once")
        #expect(queue.nextDeadline == self.t0 + .seconds(10))
        let early = queue.expired(now: self.t0 + .seconds(9))
        #expect(early.isEmpty)
        let due = queue.expired(now: self.t0 + .seconds(11))
        #expect(due == ["a", "b"])
        #expect(queue.count == 1 && queue.nextDeadline == self.t0 + .seconds(12))
    }

    @Test func aRequestThatCouldNotBeServedKeepsItsPlaceAndDeadline() {
        var queue = WaitingQueue<String>(capacity: 3)
        _ = queue.append("a", deadline: self.t0 + .seconds(10))
        _ = queue.append("b", deadline: self.t0 + .seconds(11))
        let first = queue.popFirstEntry()!
        queue.putBack(first.item, deadline: first.deadline)
        let again = queue.popFirstEntry()
        #expect(again?.item == "a" && again?.deadline == self.t0 + .seconds(10))
        let removed = queue.remove(where: { $0 == "b" })
        #expect(removed)
        let removedAgain = queue.remove(where: { $0 == "b" })
        #expect(!removedAgain)
        #expect(queue.isEmpty && queue.nextDeadline == nil)
    }

    @Test func shutdownAnswersEveryone() {
        var queue = WaitingQueue<Int>(capacity: 10)
        for i in 0..<5 { _ = queue.append(i, deadline: self.t0) }
        let answered = queue.removeAll()
        #expect(answered == [0, 1, 2, 3, 4])
        #expect(queue.isEmpty)
    }
}

struct ServerRotationTests {
    @Test func aFailureMovesOnAtOnceUntilEveryServerFailedThenBackToTheFirst() {
        var rotation = ServerRotation(count: 3)
        #expect(rotation.current == 0)
        #expect(rotation.failed() && rotation.current == 1)
        #expect(rotation.failed() && rotation.current == 2)
        // The third failure ends the round: back off, then start from the preferred first.
        #expect(!rotation.failed() && rotation.current == 0)
        #expect(rotation.failed() && rotation.current == 1)
    }

    @Test func aSuccessStartsANewRoundOnTheServerThatAnswered() {
        var rotation = ServerRotation(count: 3)
        _ = rotation.failed()
        rotation.succeeded()
        #expect(rotation.current == 1)
        // Lost later: its own server again first, then the others, then the round ends.
        #expect(rotation.failed() && rotation.current == 2)
        #expect(rotation.failed() && rotation.current == 0)
        #expect(!rotation.failed() && rotation.current == 0)
    }

    @Test func aDrainingServerIsPassedOver() {
        var rotation = ServerRotation(count: 2)
        rotation.moveOn()
        #expect(rotation.current == 1)
        rotation.moveOn()
        #expect(rotation.current == 0)
    }

    @Test func oneServerRetriesItself() {
        var rotation = ServerRotation(count: 1)
        #expect(!rotation.failed() && rotation.current == 0)
        rotation.moveOn()
        #expect(rotation.current == 0)
    }
}
