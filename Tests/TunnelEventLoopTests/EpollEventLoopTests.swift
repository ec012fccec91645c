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

    @Test func futuresChainOnTheLoop() async throws {
        let loop = try EpollEventLoop()
        let value = try await loop.submit { 20 }.flatMap { n in loop.submit { n + 1 } }.map { $0 * 2 }.get()
        #expect(value == 42)
        try await loop.shutdownGracefully()
    }
}
