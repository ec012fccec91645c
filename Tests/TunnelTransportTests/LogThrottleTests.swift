import NIOCore
import Testing

@testable import TunnelTransport

struct LogThrottleTests {
    let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func aFewLinesPerSourceThenASummaryWhenTheWindowEnds() {
        var throttle = LogThrottle<String>(burst: 3, window: .seconds(60))
        var decisions: [LogThrottle<String>.Decision] = []
        for i in 0..<10 { decisions.append(throttle.event(from: "a", now: self.start + .seconds(Int64(i)))) }
        #expect(decisions.prefix(3).allSatisfy { $0 == .log(suppressedBefore: 0) })
        #expect(decisions.dropFirst(3).allSatisfy { $0 == .suppress })
        // Another source is not held back by the first.
        #expect(throttle.event(from: "b", now: self.start + .seconds(10)) == .log(suppressedBefore: 0))
        // Nothing is due before the window is over.
        #expect(throttle.due(now: self.start + .seconds(30)).isEmpty)
        // The next line after the window says how many went unlogged.
        #expect(throttle.event(from: "a", now: self.start + .seconds(61)) == .log(suppressedBefore: 7))
        #expect(throttle.event(from: "a", now: self.start + .seconds(62)) == .log(suppressedBefore: 0))
    }

    @Test func aSourceThatWentQuietGetsItsSummaryFromTheSweep() {
        var throttle = LogThrottle<String>(burst: 1, window: .seconds(60))
        for _ in 0..<5 { _ = throttle.event(from: "a", now: self.start) }
        _ = throttle.event(from: "b", now: self.start)
        let due = throttle.due(now: self.start + .seconds(60))
        #expect(due.count == 1 && due[0].source == "a" && due[0].suppressed == 4)
        #expect(throttle.trackedSources == 0, "sources whose window is over are forgotten")
        #expect(throttle.due(now: self.start + .seconds(200)).isEmpty)
    }

    @Test func theTableOfSourcesIsBounded() {
        var throttle = LogThrottle<Int>(burst: 1, window: .seconds(60), maxSources: 100)
        var logged = 0
        for source in 0..<10_000 where throttle.event(from: source, now: self.start) != .suppress { logged += 1 }
        #expect(logged == 100 && throttle.trackedSources == 100)
        // Once the first sources' window is over, a new source finds room again.
        #expect(throttle.event(from: 99_999, now: self.start + .seconds(61)) == .log(suppressedBefore: 0))
        let due = throttle.due(now: self.start + .seconds(60))
        #expect(due.count == 1 && due[0].source == nil && due[0].suppressed == 9_900)
    }
}
