import NIOConcurrencyHelpers
import NIOCore
import Testing
import TunnelEventLoop

struct EpollEventLoopTests {
    @Test func tasksFromAnotherThreadRunOnTheLoopInOrder() async throws {
        let loop = try EpollEventLoop(name: "test-loop")
        #expect(!loop.inEventLoop)
        let seen = NIOLockedValueBox<[Int]>([])
        for i in 0..<1000 {
            loop.execute {
                precondition(loop.inEventLoop)
                seen.withLockedValue { $0.append(i) }
            }
        }
        let onLoop = try await loop.submit { loop.inEventLoop }.get()
        #expect(onLoop)
        #expect(seen.withLockedValue { $0 } == Array(0..<1000))
        try await loop.shutdownGracefully()
    }

    @Test func aScheduledTaskRunsAfterItsDeadlineNotBefore() async throws {
        let loop = try EpollEventLoop()
        let start = NIODeadline.now()
        let ran = try await loop.scheduleTask(in: .milliseconds(30)) { NIODeadline.now() }.futureResult.get()
        #expect(ran - start >= .milliseconds(30))
        #expect(ran - start < .seconds(2))
        try await loop.shutdownGracefully()
    }

    @Test func timersFireInDeadlineOrder() async throws {
        let loop = try EpollEventLoop()
        let order = NIOLockedValueBox<[Int]>([])
        let futures = [30, 10, 20].map { ms in
            loop.scheduleTask(in: .milliseconds(Int64(ms))) { order.withLockedValue { $0.append(ms) } }.futureResult
        }
        for future in futures { try await future.get() }
        #expect(order.withLockedValue { $0 } == [10, 20, 30])
        try await loop.shutdownGracefully()
    }

    @Test func aCancelledTaskNeverRunsAndItsFutureFails() async throws {
        let loop = try EpollEventLoop()
        let ran = NIOLockedValueBox(false)
        // Scheduled and cancelled from outside the loop...
        let outside = loop.scheduleTask(in: .milliseconds(20)) { ran.withLockedValue { $0 = true } }
        outside.cancel()
        // ...and both on the loop.
        let inside = try await loop.submit {
            let task = loop.scheduleTask(in: .milliseconds(20)) { ran.withLockedValue { $0 = true } }
            task.cancel()
            return task.futureResult
        }.get()
        for future in [outside.futureResult, inside] {
            await #expect(throws: EventLoopError.cancelled) { try await future.get() }
        }
        try await loop.scheduleTask(in: .milliseconds(60)) {}.futureResult.get()
        #expect(!ran.withLockedValue { $0 })
        try await loop.shutdownGracefully()
    }

    @Test func shutdownFailsPendingTimersAndRefusesLaterWork() async throws {
        let loop = try EpollEventLoop()
        let failure = NIOLockedValueBox<(any Error)?>(nil)
        try await loop.submit {
            loop.scheduleTask(in: .seconds(60)) {}.futureResult.whenFailure { error in
                failure.withLockedValue { $0 = error }
            }
        }.get()
        try await loop.shutdownGracefully()
        #expect(failure.withLockedValue { $0 } as? EventLoopError == .shutdown)
        await #expect(throws: EventLoopError.shutdown) { try await loop.shutdownGracefully() }
    }

    /// Records what a scheduled callback heard, and where.
    final class CallbackRecorder: NIOScheduledCallbackHandler, Sendable {
        let events = NIOLockedValueBox<[String]>([])
        let loop: EpollEventLoop
        init(loop: EpollEventLoop) { self.loop = loop }
        func handleScheduledCallback(eventLoop: some EventLoop) {
            precondition(self.loop.inEventLoop)
            self.events.withLockedValue { $0.append("fired at \(NIODeadline.now().uptimeNanoseconds)") }
        }
        func didCancelScheduledCallback(eventLoop: some EventLoop) {
            precondition(self.loop.inEventLoop)
            self.events.withLockedValue { $0.append("cancelled") }
        }
        var heard: [String] { self.events.withLockedValue { $0 } }
    }

    @Test func aScheduledCallbackFiresOnceAfterItsDeadline() async throws {
        let loop = try EpollEventLoop()
        let onLoop = CallbackRecorder(loop: loop)
        let offLoop = CallbackRecorder(loop: loop)
        let start = NIODeadline.now()
        try await loop.submit { _ = try loop.assumeIsolated().scheduleCallback(in: .milliseconds(30), handler: onLoop) }
            .get()
        _ = try loop.scheduleCallback(in: .milliseconds(30), handler: offLoop)
        try await loop.scheduleTask(in: .milliseconds(120)) {}.futureResult.get()
        for recorder in [onLoop, offLoop] {
            let heard = recorder.heard
            #expect(heard.count == 1)
            let firedAt = heard.first.flatMap { UInt64($0.dropFirst("fired at ".count)) } ?? 0
            #expect(firedAt >= (start + .milliseconds(30)).uptimeNanoseconds)
        }
        try await loop.shutdownGracefully()
    }

    @Test func aCancelledCallbackNeverFiresAndHearsItWasCancelled() async throws {
        let loop = try EpollEventLoop()
        let recorders = (0..<4).map { _ in CallbackRecorder(loop: loop) }
        // On the loop, scheduled and cancelled there.
        try await loop.submit {
            try loop.assumeIsolated().scheduleCallback(in: .milliseconds(20), handler: recorders[0]).cancel()
        }.get()
        // From outside, cancelled from outside.
        try loop.scheduleCallback(in: .milliseconds(20), handler: recorders[1]).cancel()
        // From outside, cancelled on the loop before the callback reached the loop's timers: a task that is
        // already running on the loop when the callback is scheduled cancels it.
        let gate = NIOLockedValueBox<NIOScheduledCallback?>(nil)
        let step = ConditionLock(value: 0)
        loop.execute {
            step.lock()
            step.unlock(withValue: 1)
            step.lock(whenValue: 2)
            step.unlock()
            gate.withLockedValue { $0 }?.cancel()
        }
        step.lock(whenValue: 1)
        gate.withLockedValue { $0 = try? loop.scheduleCallback(in: .milliseconds(20), handler: recorders[2]) }
        step.unlock(withValue: 2)
        // Cancelled after it fired: nothing more happens.
        let fired = try loop.scheduleCallback(in: .milliseconds(1), handler: recorders[3])
        try await loop.scheduleTask(in: .milliseconds(30)) {}.futureResult.get()
        fired.cancel()
        try await loop.scheduleTask(in: .milliseconds(60)) {}.futureResult.get()
        for recorder in recorders.prefix(3) { #expect(recorder.heard == ["cancelled"]) }
        #expect(recorders[3].heard.count == 1 && recorders[3].heard[0].hasPrefix("fired"))
        try await loop.shutdownGracefully()
    }

    @Test func shutdownCancelsPendingCallbacks() async throws {
        let loop = try EpollEventLoop()
        let recorder = CallbackRecorder(loop: loop)
        _ = try loop.scheduleCallback(in: .seconds(60), handler: recorder)
        try await loop.submit {}.get()
        try await loop.shutdownGracefully()
        #expect(recorder.heard == ["cancelled"])
        // After shutdown a callback is refused at once, not accepted and forgotten.
        #expect(throws: EventLoopError.shutdown) { try loop.scheduleCallback(in: .seconds(1), handler: recorder) }
    }

    @Test func futuresChainOnTheLoop() async throws {
        let loop = try EpollEventLoop()
        let value = try await loop.submit { 20 }.flatMap { n in loop.submit { n + 1 } }.map { $0 * 2 }.get()
        #expect(value == 42)
        try await loop.shutdownGracefully()
    }
}
