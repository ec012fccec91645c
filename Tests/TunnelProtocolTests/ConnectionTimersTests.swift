import NIOCore
import Testing
import TunnelProtocol

/// The connection timers on a fake clock: no event loop, no waiting.
struct ConnectionTimersTests {
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
    let configuration = ConnectionTimers.Configuration(
        handshakeTimeout: .seconds(10),
        keepaliveInterval: .seconds(15),
        deadTimeout: .seconds(45)
    )

    /// Ticks every `tickInterval` from `start` to `end`; returns each tick's time and actions.
    func run(
        _ timers: inout ConnectionTimers,
        from start: NIODeadline,
        to end: NIODeadline
    ) -> [(NIODeadline, [ConnectionTimers.Action])] {
        var out: [(NIODeadline, [ConnectionTimers.Action])] = []
        var now = start
        while now <= end {
            out.append((now, timers.tick(now: now)))
            now = now + timers.tickInterval
        }
        return out
    }

    @Test func aHandshakeThatNeverFinishesTimesOutWithinASecondOfItsDeadline() {
        var timers = ConnectionTimers(configuration: self.configuration, now: self.t0)
        timers.started(now: self.t0)
        #expect(timers.tickInterval == .seconds(1))
        let ticks = self.run(&timers, from: self.t0, to: self.t0 + .seconds(12))
        let first = ticks.first { !$0.1.isEmpty }
        #expect(first?.1 == [.handshakeTimedOut])
        #expect(first.map { $0.0 - self.t0 } == .seconds(10))
        // Receiving bytes does not extend the handshake.
        timers.received(now: self.t0 + .seconds(9))
        #expect(timers.tick(now: self.t0 + .seconds(10)) == [.handshakeTimedOut])
    }

    @Test func anEstablishedConnectionPingsWhenIdleAndIsDeadAfterTheTimeout() {
        var timers = ConnectionTimers(configuration: self.configuration, now: self.t0)
        timers.started(now: self.t0)
        timers.received(now: self.t0 + .milliseconds(50))
        timers.established(now: self.t0 + .milliseconds(50))
        #expect(timers.tickInterval == .seconds(5))
        #expect(timers.tick(now: self.t0 + .seconds(5)) == [.upkeep])
        #expect(timers.tick(now: self.t0 + .seconds(14)) == [.upkeep])
        #expect(timers.tick(now: self.t0 + .seconds(16)) == [.sendPing, .upkeep])
        // The PING's answer (or anything) arrives: quiet again.
        timers.received(now: self.t0 + .seconds(16))
        #expect(timers.tick(now: self.t0 + .seconds(20)) == [.upkeep])
        // Then silence: pings every tick from 15 s, dead at 45 s.
        let ticks = self.run(&timers, from: self.t0 + .seconds(21), to: self.t0 + .seconds(70))
        let pings = ticks.filter { $0.1.contains(.sendPing) }.map { $0.0 - self.t0 - .seconds(16) }
        #expect(pings.first.map { $0 >= .seconds(15) && $0 < .seconds(20) } == true)
        let dead = ticks.first { if case .dead = $0.1.first { true } else { false } }
        #expect(dead.map { $0.0 - self.t0 - .seconds(16) }.map { $0 >= .seconds(45) && $0 < .seconds(50) } == true)
        #expect(dead?.1.count == 1, "a fatal action comes alone")
    }

    @Test func trafficKeepsAConnectionAliveIndefinitely() {
        var timers = ConnectionTimers(configuration: self.configuration, now: self.t0)
        timers.established(now: self.t0)
        var now = self.t0
        for _ in 0..<1000 {
            now = now + .seconds(5)
            timers.received(now: now - .seconds(1))
            #expect(timers.tick(now: now) == [.upkeep])
        }
    }
}
