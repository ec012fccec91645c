import Dispatch
import NIOConcurrencyHelpers
import NIOCore

/// Several `EpollEventLoop`s, one thread each (the server runs one per core): `next()` hands them out in turn.
public final class EpollEventLoopGroup: EventLoopGroup, Sendable {
    public let loops: [EpollEventLoop]
    private let turn = NIOLockedValueBox(0)

    /// `count` loops (at least one), their threads named `name-0`, `name-1`...
    public init(count: Int, name: String = "tunnel-loop") throws {
        var loops: [EpollEventLoop] = []
        do {
            for index in 0..<max(1, count) {
                loops.append(try EpollEventLoop(name: count > 1 ? "\(name)-\(index)" : name))
            }
        } catch {
            for loop in loops { loop.shutdownGracefully { _ in } }
            throw error
        }
        self.loops = loops
    }

    public func next() -> any EventLoop { self.nextLoop() }

    /// The next loop in turn, as itself.
    public func nextLoop() -> EpollEventLoop {
        guard self.loops.count > 1 else { return self.loops[0] }
        let index = self.turn.withLockedValue { turn in
            defer { turn = (turn + 1) % self.loops.count }
            return turn
        }
        return self.loops[index]
    }

    public func any() -> any EventLoop {
        for loop in self.loops where loop.inEventLoop { return loop }
        return self.next()
    }

    public func makeIterator() -> EventLoopIterator { EventLoopIterator(self.loops) }

    public func shutdownGracefully(queue: DispatchQueue, _ callback: @escaping @Sendable ((any Error)?) -> Void) {
        let group = DispatchGroup()
        let firstError = NIOLockedValueBox<(any Error)?>(nil)
        for loop in self.loops {
            group.enter()
            loop.shutdownGracefully(queue: queue) { error in
                if let error { firstError.withLockedValue { $0 = $0 ?? error } }
                group.leave()
            }
        }
        group.notify(queue: queue) { callback(firstError.withLockedValue { $0 }) }
    }
}
