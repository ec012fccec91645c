import CEpoll
import Dispatch
import NIOConcurrencyHelpers
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// What the loop tells about a registered descriptor.
protocol EpollSelectable: AnyObject {
    /// The descriptor is ready (`CEPOLL_*` bits; edge-triggered: once per change).
    func ready(_ events: UInt32)
    /// A pass asked for with `EpollEventLoop.requestPass(for:)`, run before the loop next waits.
    func runPass()
    /// The loop is shutting down: close.
    func loopClosing()
}

/// An event loop of our own on one thread: epoll (edge-triggered, one `epoll_ctl` per descriptor for its
/// whole life), an eventfd for work handed in from other threads, and timers. It is a NIOCore `EventLoop`,
/// so futures, promises and every `ChannelHandler` work on it unchanged; its channels
/// (`EpollStreamChannel`, `EpollListener`) carry NIOCore pipelines without NIOPosix's per-channel machinery
/// (README, *Performance*).
public final class EpollEventLoop: EventLoop, @unchecked Sendable {
    private enum State { case running, closing, closed }

    private struct Slot {
        var generation: UInt32 = 0
        var object: (any EpollSelectable)?
    }

    private let epoll: Int32
    private let wakeDescriptor: Int32
    private static let wakeToken = UInt64.max
    private let started = ConditionLock(value: 0)
    private var thread = pthread_t()

    // Loop thread only.
    private var state = State.running
    private var tasks: [() -> Void] = []
    private var running: [() -> Void] = []
    private var timers = TimerQueue<any TimerWork>()
    private var slots: [Slot] = []
    private var freeSlots: [Int] = []
    private var passes: [any EpollSelectable] = []
    /// The `iovec`s of a stream channel's write pass, one set per loop (a pass fills them and writes at once,
    /// so the loop's channels can share them): 1 KiB less for each open socket.
    let writeVectors = UnsafeMutablePointer<iovec>.allocate(capacity: EpollEventLoop.writeVectorCount)
    static let writeVectorCount = 64
    private var shutdownCallbacks: [(DispatchQueue, @Sendable ((any Error)?) -> Void)] = []

    // Shared with other threads, under `lock`.
    private let lock = NIOLock()
    private var handedIn: [@Sendable () -> Void] = []
    /// Callbacks scheduled from other threads, on their way to the timer queue.
    private var offLoopCallbacks: [UInt64: CallbackWork] = [:]
    private var nextOffLoopCallback = TimerQueue<any TimerWork>.externalIDs
    private var wakePending = false
    private var acceptsWork = true

    /// A loop on a thread of its own named `name`, running until `shutdownGracefully`.
    public init(name: String = "tunnel-loop") throws {
        self.epoll = cepoll_create()
        guard self.epoll >= 0 else { throw IOError(errnoCode: errno, reason: "epoll_create1") }
        self.wakeDescriptor = cepoll_eventfd()
        guard self.wakeDescriptor >= 0 else {
            let code = errno
            Glibc.close(self.epoll)
            throw IOError(errnoCode: code, reason: "eventfd")
        }
        _ = cepoll_ctl(self.epoll, 1, self.wakeDescriptor, CEPOLL_IN | CEPOLL_ET, Self.wakeToken)
        let box = Unmanaged.passRetained(ThreadStart(loop: self, name: name))
        var handle = pthread_t()
        let result = pthread_create(
            &handle,
            nil,
            { argument in
                let start = Unmanaged<ThreadStart>.fromOpaque(argument!).takeRetainedValue()
                start.run()
                return nil
            },
            box.toOpaque()
        )
        precondition(result == 0, "pthread_create failed: \(result)")
        pthread_detach(handle)
        self.started.lock(whenValue: 1)
        self.started.unlock()
    }

    deinit {
        self.writeVectors.deallocate()
    }

    private final class ThreadStart {
        let loop: EpollEventLoop
        let name: String
        init(loop: EpollEventLoop, name: String) {
            self.loop = loop
            self.name = name
        }
        func run() {
            cepoll_set_thread_name(String(self.name.prefix(15)))
            self.loop.thread = pthread_self()
            self.loop.started.lock()
            self.loop.started.unlock(withValue: 1)
            self.loop.run()
        }
    }

    // MARK: EventLoop

    public var inEventLoop: Bool { pthread_equal(pthread_self(), self.thread) != 0 }

    public func execute(_ task: @escaping @Sendable () -> Void) {
        if self.inEventLoop {
            self.tasks.append(task)
            return
        }
        let wake = self.lock.withLock { () -> Bool in
            // After shutdown the work is dropped, as NIO's loops do (a programming error to hand it in).
            guard self.acceptsWork else { return false }
            self.handedIn.append(task)
            defer { self.wakePending = true }
            return !self.wakePending
        }
        if wake { self.wake() }
    }

    /// Runs `task` on the loop soon; on the loop only (no lock, no `Sendable` needed).
    func executeOnLoop(_ task: @escaping () -> Void) {
        self.tasks.append(task)
    }

    public func scheduleTask<T>(deadline: NIODeadline, _ task: @escaping @Sendable () throws -> T) -> Scheduled<T> {
        let promise = self.makePromise(of: T.self)
        let work = ScheduledWork(promise: promise, task: task)
        let when = deadline.uptimeNanoseconds
        if self.inEventLoop {
            work.id = self.timers.schedule(work, at: when)
        } else {
            let box = UnsafeTransfer(work)
            self.execute {
                let work = box.value
                guard !work.cancelled else { return }
                work.id = self.timers.schedule(work, at: when)
            }
        }
        // Touched only on the loop (the cancellation hops there).
        let box = UnsafeTransfer(work)
        return Scheduled(promise: promise) { [self] in
            if self.inEventLoop {
                self.cancel(box.value)
            } else {
                self.execute { self.cancel(box.value) }
            }
        }
    }

    public func scheduleTask<T>(in delay: TimeAmount, _ task: @escaping @Sendable () throws -> T) -> Scheduled<T> {
        self.scheduleTask(deadline: .now() + delay, task)
    }

    // MARK: Scheduled callbacks (NIO's `scheduleCallback`)

    /// Runs `handler` at `deadline` without a promise, a future or a closure: the cheap way to set a time limit
    /// on every connection (a handshake's, cancelled in the common case). Off the loop the callback reaches
    /// the timer queue through `execute`; its id is known at once.
    public func scheduleCallback(
        at deadline: NIODeadline,
        handler: some (NIOScheduledCallbackHandler & Sendable)
    ) throws -> NIOScheduledCallback {
        let work = CallbackWork(handler: handler, loop: self)
        let when = deadline.uptimeNanoseconds
        if self.inEventLoop {
            work.id = self.timers.schedule(work, at: when)
            return NIOScheduledCallback(self, id: work.id!)
        }
        // Checked under the lock that shutdown takes too: a callback accepted here is either handed to the
        // timers or cancelled by `finish`, never left behind.
        let id = try self.lock.withLock { () throws -> UInt64 in
            guard self.acceptsWork else { throw EventLoopError.shutdown }
            defer { self.nextOffLoopCallback &+= 1 }
            self.offLoopCallbacks[self.nextOffLoopCallback] = work
            return self.nextOffLoopCallback
        }
        work.id = id
        self.execute {
            guard let work = self.lock.withLock({ self.offLoopCallbacks.removeValue(forKey: id) }) else { return }
            _ = self.timers.schedule(work, at: when, id: id)
        }
        return NIOScheduledCallback(self, id: id)
    }

    /// Cancels a callback of `scheduleCallback`: its handler hears `didCancelScheduledCallback`, unless it ran.
    public func cancelScheduledCallback(_ scheduledCallback: NIOScheduledCallback) {
        guard let id = scheduledCallback.customCallbackID else { return }
        guard self.inEventLoop else {
            self.execute { self.cancelCallback(id) }
            return
        }
        self.cancelCallback(id)
    }

    private func cancelCallback(_ id: UInt64) {
        var work = self.timers.cancel(id)
        if work == nil, id >= TimerQueue<any TimerWork>.externalIDs {
            work = self.lock.withLock { self.offLoopCallbacks.removeValue(forKey: id) }
        }
        guard let work, !work.cancelled else { return }
        work.cancelled = true
        work.fail(EventLoopError.cancelled)
    }

    private func cancel(_ work: any TimerWork) {
        guard !work.cancelled else { return }
        work.cancelled = true
        if let id = work.id, self.timers.cancel(id) != nil {
            work.fail(EventLoopError.cancelled)
        } else if work.id == nil {
            work.fail(EventLoopError.cancelled)
        }
    }

    public func preconditionInEventLoop(file: StaticString, line: UInt) {
        precondition(self.inEventLoop, "not on the event loop", file: file, line: line)
    }

    public func preconditionNotInEventLoop(file: StaticString, line: UInt) {
        precondition(!self.inEventLoop, "on the event loop", file: file, line: line)
    }

    public func shutdownGracefully(queue: DispatchQueue, _ callback: @escaping @Sendable ((any Error)?) -> Void) {
        let accepted = self.lock.withLock { self.acceptsWork }
        guard accepted else {
            queue.async { callback(EventLoopError.shutdown) }
            return
        }
        self.execute {
            self.shutdownCallbacks.append((queue, callback))
            guard self.state == .running else { return }
            self.state = .closing
            for slot in self.slots { slot.object?.loopClosing() }
        }
    }

    // MARK: Registration (loop thread only)

    /// A registration's token: the slot's index and generation, so an event for a descriptor that was closed
    /// and replaced in the same wait finds no one.
    struct Registration {
        fileprivate let index: Int
        fileprivate let generation: UInt32
        fileprivate var token: UInt64 { UInt64(self.generation) << 32 | UInt64(self.index) }
    }

    /// Watches `descriptor` for `events` (edge-triggered) until `deregister`; the loop keeps `object` alive
    /// until then.
    func register(_ object: any EpollSelectable, descriptor: Int32, events: UInt32) throws -> Registration {
        let index: Int
        if let free = self.freeSlots.popLast() {
            index = free
        } else {
            index = self.slots.count
            self.slots.append(Slot())
        }
        self.slots[index].generation &+= 1
        self.slots[index].object = object
        let registration = Registration(index: index, generation: self.slots[index].generation)
        guard cepoll_ctl(self.epoll, 1, descriptor, events | CEPOLL_ET, registration.token) == 0 else {
            let code = errno
            self.slots[index].object = nil
            self.freeSlots.append(index)
            throw IOError(errnoCode: code, reason: "epoll_ctl")
        }
        return registration
    }

    /// Forgets a registration. The descriptor leaves epoll when it is closed (when it was the socket's only
    /// descriptor: see `EpollStreamChannel.duplicateDescriptor()`), so this costs no system call; call it before
    /// closing the descriptor.
    func deregister(_ registration: Registration) {
        guard self.slots[registration.index].generation == registration.generation,
            self.slots[registration.index].object != nil
        else { return }
        self.slots[registration.index].object = nil
        self.freeSlots.append(registration.index)
    }

    /// Forgets a registration and takes `descriptor` out of epoll now, for a descriptor that stays open and is
    /// registered again by another owner (a duplicated socket that goes on on another loop).
    func deregister(_ registration: Registration, removing descriptor: Int32) {
        self.deregister(registration)
        _ = cepoll_ctl(self.epoll, 2, descriptor, 0, 0)
    }

    /// Hands a registration to a new owner of the same descriptor, watched for the same events: no system call.
    /// Events epoll reports for it from now on go to `object`.
    func transfer(_ registration: Registration, to object: any EpollSelectable) -> Registration {
        precondition(self.slots[registration.index].generation == registration.generation)
        self.slots[registration.index].object = object
        return registration
    }

    /// Runs `object.runPass()` before the loop next waits (after the tasks queued so far).
    func requestPass(for object: any EpollSelectable) {
        self.passes.append(object)
    }

    // MARK: The loop

    private func wake() {
        var one: UInt64 = 1
        _ = write(self.wakeDescriptor, &one, 8)
    }

    private func run() {
        let events = UnsafeMutablePointer<cepoll_event>.allocate(capacity: 256)
        defer { events.deallocate() }
        while true {
            self.takeHandedIn()
            self.runTasks()
            self.runPasses()
            self.runTimers()
            if self.state == .closing && self.tasks.isEmpty && self.passes.isEmpty && self.quiescent() { break }
            let timeout: Int64
            if !self.tasks.isEmpty || !self.passes.isEmpty {
                timeout = 0
            } else if let deadline = self.timers.nextDeadline() {
                let now = NIODeadline.now().uptimeNanoseconds
                timeout = deadline > now ? Int64(deadline - now) : 0
            } else {
                timeout = -1
            }
            let count = cepoll_wait(self.epoll, events, 256, timeout)
            guard count > 0 else { continue }
            for i in 0..<Int(count) {
                let event = events[i]
                if event.data == Self.wakeToken {
                    var value: UInt64 = 0
                    _ = read(self.wakeDescriptor, &value, 8)
                    continue
                }
                let index = Int(truncatingIfNeeded: event.data & 0xFFFF_FFFF)
                let generation = UInt32(truncatingIfNeeded: event.data >> 32)
                guard index < self.slots.count, self.slots[index].generation == generation,
                    let object = self.slots[index].object
                else { continue }
                object.ready(event.events)
            }
        }
        self.finish()
    }

    private func quiescent() -> Bool {
        self.lock.withLock { self.handedIn.isEmpty } && !self.slots.contains { $0.object != nil }
    }

    private func takeHandedIn() {
        let batch = self.lock.withLock { () -> [@Sendable () -> Void] in
            self.wakePending = false
            guard !self.handedIn.isEmpty else { return [] }
            defer { self.handedIn.removeAll(keepingCapacity: true) }
            return self.handedIn
        }
        for task in batch { task() }
    }

    /// Runs the tasks queued so far; tasks they queue run in the next round, after the loop has looked at
    /// its descriptors (so a task that requeues itself cannot starve I/O).
    private func runTasks() {
        guard !self.tasks.isEmpty else { return }
        swap(&self.tasks, &self.running)
        for task in self.running { task() }
        self.running.removeAll(keepingCapacity: true)
    }

    private func runPasses() {
        guard !self.passes.isEmpty else { return }
        let batch = self.passes
        self.passes.removeAll(keepingCapacity: true)
        for object in batch { object.runPass() }
    }

    private func runTimers() {
        guard !self.timers.isEmpty else { return }
        let now = NIODeadline.now().uptimeNanoseconds
        while let work = self.timers.popDue(now: now) {
            work.cancelled = true
            work.fire()
        }
    }

    private func finish() {
        let late = self.lock.withLock { () -> [@Sendable () -> Void] in
            self.acceptsWork = false
            defer { self.handedIn.removeAll() }
            return self.handedIn
        }
        // Work handed in before the door closed runs first, so what it schedules is cancelled below with the rest.
        for task in late { task() }
        for work in self.timers.removeAll() { work.fail(EventLoopError.shutdown) }
        let stranded = self.lock.withLock { () -> [CallbackWork] in
            defer { self.offLoopCallbacks.removeAll() }
            return Array(self.offLoopCallbacks.values)
        }
        for work in stranded { work.fail(EventLoopError.shutdown) }
        self.state = .closed
        Glibc.close(self.wakeDescriptor)
        Glibc.close(self.epoll)
        for (queue, callback) in self.shutdownCallbacks { queue.async { callback(nil) } }
        self.shutdownCallbacks.removeAll()
    }
}

/// A scheduled task as the timer queue holds it.
protocol TimerWork: AnyObject {
    var id: UInt64? { get set }
    var cancelled: Bool { get set }
    func fire()
    func fail(_ error: any Error)
}

/// A callback of `scheduleCallback`: the handler, called on the loop.
private final class CallbackWork: TimerWork {
    let handler: any NIOScheduledCallbackHandler
    let loop: EpollEventLoop
    var id: UInt64?
    var cancelled = false

    init(handler: any NIOScheduledCallbackHandler, loop: EpollEventLoop) {
        self.handler = handler
        self.loop = loop
    }

    func fire() { self.handler.handleScheduledCallback(eventLoop: self.loop) }

    func fail(_ error: any Error) { self.handler.didCancelScheduledCallback(eventLoop: self.loop) }
}

private final class ScheduledWork<T>: TimerWork {
    let promise: EventLoopPromise<T>
    let task: @Sendable () throws -> T
    var id: UInt64?
    var cancelled = false

    init(promise: EventLoopPromise<T>, task: @escaping @Sendable () throws -> T) {
        self.promise = promise
        self.task = task
    }

    func fire() {
        // On the loop: the value stays on the promise's own loop.
        do {
            self.promise.assumeIsolatedUnsafeUnchecked().succeed(try self.task())
        } catch {
            self.promise.fail(error)
        }
    }

    func fail(_ error: any Error) {
        self.promise.fail(error)
    }
}
