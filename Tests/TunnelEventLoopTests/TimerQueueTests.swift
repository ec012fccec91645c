import Testing
import TunnelTestSupport

@testable import TunnelEventLoop

struct TimerQueueTests {
    @Test func earliestDeadlineFirstAndTiesInScheduleOrder() {
        var queue = TimerQueue<String>()
        _ = queue.schedule("late", at: 300)
        _ = queue.schedule("first of two", at: 100)
        _ = queue.schedule("second of two", at: 100)
        _ = queue.schedule("middle", at: 200)
        #expect(queue.nextDeadline() == 100)
        #expect(queue.popDue(now: 99) == nil)
        var order: [String] = []
        while let work = queue.popDue(now: 1000) { order.append(work) }
        #expect(order == ["first of two", "second of two", "middle", "late"])
        #expect(queue.isEmpty)
        #expect(queue.nextDeadline() == nil)
    }

    @Test func cancelledWorkIsHandedBackAndNeverRuns() {
        var queue = TimerQueue<Int>()
        let a = queue.schedule(1, at: 10)
        _ = queue.schedule(2, at: 20)
        #expect(queue.cancel(a) == 1)
        #expect(queue.cancel(a) == nil)
        #expect(queue.count == 1)
        #expect(queue.nextDeadline() == 20)
        #expect(queue.popDue(now: 100) == 2)
        #expect(queue.popDue(now: 100) == nil)
    }

    @Test func removeAllHandsBackEveryPendingWork() {
        var queue = TimerQueue<Int>()
        _ = queue.schedule(1, at: 30)
        let b = queue.schedule(2, at: 10)
        _ = queue.schedule(3, at: 20)
        _ = queue.cancel(b)
        #expect(queue.removeAll() == [1, 3])
        #expect(queue.isEmpty)
        #expect(queue.popDue(now: .max) == nil)
    }

    /// Random schedules, cancels (enough to make the heap rebuild) and pops against a plain list.
    @Test func matchesASortedListUnderRandomOperations() {
        var generator = SplitMix64(seed: 2026)  // fixed: a failure replays the same way
        var queue = TimerQueue<UInt64>()
        var model: [(deadline: UInt64, id: UInt64, work: UInt64)] = []
        var now: UInt64 = 0
        var serial: UInt64 = 0
        for _ in 0..<20000 {
            switch generator.next() % 10 {
            case 0...4:
                let deadline = now + generator.next() % 1000
                serial += 1
                let id = queue.schedule(serial, at: deadline)
                model.append((deadline, id, serial))
            case 5...7:
                guard !model.isEmpty else { continue }
                let index = Int(generator.next() % UInt64(model.count))
                let id = model.remove(at: index).id
                #expect(queue.cancel(id) != nil)
            default:
                now += generator.next() % 300
                model.sort { ($0.deadline, $0.id) < ($1.deadline, $1.id) }
                while let first = model.first, first.deadline <= now {
                    model.removeFirst()
                    #expect(queue.nextDeadline() == first.deadline)
                    #expect(queue.popDue(now: now) == first.work)
                }
                #expect(queue.popDue(now: now) == nil)
            }
            #expect(queue.count == model.count)
        }
    }
}
