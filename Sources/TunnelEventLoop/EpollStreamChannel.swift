import Atomics
import CEpoll
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// A connected TCP socket as a NIOCore `Channel` on an `EpollEventLoop`: the pipeline, options, reads,
/// writes, half-closure and writability behave as on a NIOPosix socket channel, so the same handlers run on
/// it, at a fraction of the cost per connection (one `epoll_ctl` for the socket's life, no lifecycle
/// futures, no address lookups unless asked).
///
/// Reads: on `read()` (or always, with auto-read) up to `maxMessagesPerRead` reads per readiness, each into a
/// buffer from the receive allocator, then `channelReadComplete`; a short read means the socket is drained
/// (edge-triggered readiness reports any later data). Once the peer has finished (RDHUP), the rest and the
/// end are read without waiting for `read()`, as NIOPosix does. End of input: `ChannelEvent.inputClosed` with
/// remote half-closure allowed, else the channel closes. Writes: queued until flushed, then written with one
/// `sendmsg` of up to 64 buffers; the rest waits for the socket to turn writable. Writability follows the
/// write buffer watermarks.
public final class EpollStreamChannel: Channel, ChannelCore, DescriptorOptionProvider, LoopOptionChannel,
    @unchecked Sendable
{
    private struct PendingWrite {
        var buffer: ByteBuffer
        var promise: EventLoopPromise<Void>?
    }

    public let loop: EpollEventLoop
    public var eventLoop: any EventLoop { self.loop }
    public let allocator = ByteBufferAllocator()
    public let parent: (any Channel)?
    public var _channelCore: any ChannelCore { self }
    public var pipeline: ChannelPipeline { self.pipelineStorage }
    public var closeFuture: EventLoopFuture<Void> { self.closePromise.futureResult }
    /// The socket (owned: closed with the channel).
    public var descriptor: Int32 { self.socket.number }
    let socket: GuardedDescriptor

    private var pipelineStorage: ChannelPipeline!
    private let closePromise: EventLoopPromise<Void>
    private var registration: EpollEventLoop.Registration?
    private let activeFlag = ManagedAtomic(false)
    let writableFlag = ManagedAtomic(true)

    // Loop thread only.
    private var open = true
    var options = SocketOptions()
    private var readPending = false
    private var readable = false
    /// The peer's end of input (or a hang-up) was reported: a short read no longer means drained, since the
    /// end itself still waits to be read and no new edge will announce it.
    private var peerFinished = false
    private var passRequested = false
    /// `duplicateDescriptor()` was called: the socket outlives this descriptor, so closing takes it out of
    /// epoll explicitly.
    private var duplicated = false
    private var inputClosed = false
    private var inputShutDownHere = false
    private var outputClosed = false
    private var outputClosePromise: EventLoopPromise<Void>??
    private var socketWritable = true
    private var writing = false
    private var queue = CircularBuffer<PendingWrite>(initialCapacity: 4)
    private var flushedCount = 0
    private(set) var bufferedBytes = 0
    /// Bytes written and not yet taken by the kernel, as `.bufferedWritableBytes` tells, without the generic
    /// option lookup (a stream's relay asks after every flush). On the loop.
    public var bufferedWritableBytes: Int { self.bufferedBytes }
    private static var maxVectors: Int { EpollEventLoop.writeVectorCount }

    /// A channel for `descriptor` (connected, non-blocking), not yet registered: add handlers and set options,
    /// then `activate()` on the loop. `remote` is the peer's address when known (from `accept`).
    public init(descriptor: Int32, loop: EpollEventLoop, parent: (any Channel)? = nil, remote: SocketAddress? = nil) {
        self.socket = GuardedDescriptor(descriptor, remote: remote)
        self.loop = loop
        self.parent = parent
        self.closePromise = loop.makePromise()
        self.pipelineStorage = ChannelPipeline(channel: self)
    }

    /// Registers the socket with the loop and fires `channelRegistered` and `channelActive` (then reads, with
    /// auto-read on). On the loop. A failure closes the channel and is returned.
    @discardableResult
    public func activate() -> (any Error)? {
        self.activate(takingOver: nil)
    }

    /// The events a stream channel watches (edge-triggered).
    static let watchedEvents = CEPOLL_IN | CEPOLL_OUT | CEPOLL_RDHUP

    /// `activate`; with `watched`, the socket is already registered for `watchedEvents` (a connect that just
    /// completed): the channel takes that registration and acts on the events it reported.
    func activate(takingOver watched: (registration: EpollEventLoop.Registration, events: UInt32)?) -> (any Error)? {
        self.loop.preconditionInEventLoop()
        if let watched {
            self.registration = self.loop.transfer(watched.registration, to: self)
        } else {
            do {
                self.registration = try self.loop.register(
                    self,
                    descriptor: self.descriptor,
                    events: Self.watchedEvents
                )
            } catch {
                self.close0(error: error, mode: .all, promise: nil)
                return error
            }
        }
        self.activeFlag.store(true, ordering: .relaxed)
        self.pipeline.syncOperations.fireChannelRegistered()
        self.pipeline.syncOperations.fireChannelActive()
        if self.options.autoRead && self.open { self.read0() }
        // Registering would have reported the socket's state as a first event; a registration taken over
        // reported it already.
        if let watched, self.open { self.ready(watched.events) }
        return nil
    }

    // MARK: Channel

    /// A second descriptor of this channel's socket (close-on-exec) for a new owner that takes the connection
    /// over (the server hands a resumed session's connection to that session's loop); nil once closed or when
    /// out of descriptors. On the loop.
    public func duplicateDescriptor() -> Int32? {
        self.loop.preconditionInEventLoop()
        guard self.open else { return nil }
        let copy = fcntl(self.socket.number, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { return nil }
        self.duplicated = true
        return copy
    }

    public var isActive: Bool { self.activeFlag.load(ordering: .relaxed) }
    public var isWritable: Bool { self.writableFlag.load(ordering: .relaxed) }

    public var localAddress: SocketAddress? { try? self.localAddress0() }
    public var remoteAddress: SocketAddress? { try? self.remoteAddress0() }

    public func localAddress0() throws -> SocketAddress {
        try self.socket.address(peer: false)
    }

    public func remoteAddress0() throws -> SocketAddress {
        try self.socket.address(peer: true)
    }

    public var syncOptions: (any NIOSynchronousChannelOptions)? { SynchronousOptions(channel: self) }

    public func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) -> EventLoopFuture<Void> {
        self.setOptionFuture(option, value: value)
    }

    public func getOption<Option: ChannelOption>(_ option: Option) -> EventLoopFuture<Option.Value> {
        self.getOptionFuture(option)
    }

    func optionsChanged(_ change: SocketOptions.Change) {
        if change == .autoReadOn && self.isActive { self.read0() }
    }

    // MARK: ChannelCore

    public func register0(promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }

    public func registerAlreadyConfigured0(promise: EventLoopPromise<Void>?) {
        if let error = self.activate() {
            promise?.fail(error)
        } else {
            promise?.succeed()
        }
    }

    public func bind0(to: SocketAddress, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }

    public func connect0(to: SocketAddress, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }

    public func write0(_ data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard self.open else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        guard !self.outputClosed, self.outputClosePromise == nil else {
            promise?.fail(ChannelError.outputClosed)
            return
        }
        guard case .byteBuffer(let buffer) = self.unwrapData(data, as: IOData.self) else {
            promise?.fail(ChannelError.operationUnsupported)
            return
        }
        self.queue.append(PendingWrite(buffer: buffer, promise: promise))
        self.bufferedBytes += buffer.readableBytes
        if self.bufferedBytes > self.options.waterMark.high && self.isWritable {
            self.writableFlag.store(false, ordering: .relaxed)
            self.pipeline.syncOperations.fireChannelWritabilityChanged()
        }
    }

    public func flush0() {
        guard self.open else { return }
        self.flushedCount = self.queue.count
        if self.socketWritable { self.writeFlushed() }
    }

    public func read0() {
        guard self.open, !self.inputClosed else { return }
        self.readPending = true
        if self.readable { self.requestPass() }
    }

    public func close0(error: any Error, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard self.open else {
            promise?.fail(ChannelError.alreadyClosed)
            return
        }
        switch mode {
        case .all:
            self.closeAll(error: error, promise: promise)
        case .output:
            guard !self.outputClosed, self.outputClosePromise == nil else {
                promise?.fail(ChannelError.outputClosed)
                return
            }
            if self.inputShutDownHere {
                self.closeAll(error: error, promise: promise)
            } else if self.queue.isEmpty {
                self.shutDownOutput(promise: promise)
            } else {
                // After what is queued: flush it all first.
                self.outputClosePromise = .some(promise)
                self.flushedCount = self.queue.count
                if self.socketWritable { self.writeFlushed() }
            }
        case .input:
            guard !self.inputShutDownHere else {
                promise?.fail(ChannelError.inputClosed)
                return
            }
            _ = shutdown(self.descriptor, Int32(SHUT_RD))
            self.inputShutDownHere = true
            self.inputClosed = true
            promise?.succeed()
        }
    }

    public func triggerUserOutboundEvent0(_ event: Any, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }

    public func channelRead0(_ data: NIOAny) {}

    public func errorCaught0(error: any Error) {}

    // MARK: I/O

    private func requestPass() {
        guard !self.passRequested else { return }
        self.passRequested = true
        self.loop.requestPass(for: self)
    }

    private func readAvailable() {
        // Once the peer has finished, everything up to the end is read whether asked or not, as NIOPosix does
        // (`readEOF`): a handler waiting with reads off still learns that its peer left.
        guard self.open, !self.inputClosed, self.readable,
            self.readPending || self.options.autoRead || self.peerFinished
        else { return }
        var reads: UInt = 0
        var endOfInput = false
        while reads < self.options.maxMessagesPerRead {
            var buffer = self.options.receiveAllocator.buffer(allocator: self.allocator)
            let capacity = buffer.writableBytes
            var failure: Int32 = 0
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 0) { pointer -> Int in
                let result = Glibc.read(self.descriptor, pointer.baseAddress, pointer.count)
                if result < 0 { failure = errno }
                return max(result, 0)
            }
            if count > 0 {
                _ = self.options.receiveAllocator.record(actualReadBytes: count)
                self.readPending = false
                reads += 1
                self.pipeline.syncOperations.fireChannelRead(NIOAny(buffer))
                guard self.open else { return }
                if count < capacity {
                    self.readable = self.peerFinished
                    break
                }
            } else if failure == 0 {
                endOfInput = true
                self.readable = false
                break
            } else if failure == EAGAIN || failure == EWOULDBLOCK {
                self.readable = false
                break
            } else if failure == EINTR {
                continue
            } else {
                if reads > 0 { self.pipeline.syncOperations.fireChannelReadComplete() }
                self.fail(IOError(errnoCode: failure, reason: "read"))
                return
            }
        }
        if reads > 0 {
            self.pipeline.syncOperations.fireChannelReadComplete()
            guard self.open else { return }
        }
        if endOfInput {
            self.inputClosed = true
            if self.options.allowRemoteHalfClosure {
                self.pipeline.syncOperations.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            } else {
                self.close0(error: ChannelError.eof, mode: .all, promise: nil)
            }
        } else if self.readable && (self.readPending || self.options.autoRead || self.peerFinished) {
            // More to read than one turn takes: the rest after the loop's other work.
            self.requestPass()
        }
    }

    /// Writes the flushed part of the queue until it is empty or the socket is full.
    private func writeFlushed() {
        // A completed write's callback may write and flush again: the loop below takes that up.
        guard !self.writing else { return }
        self.writing = true
        self.writeQueue()
        self.writing = false
        guard self.open else { return }
        // Not while writing: a handler told the channel is writable again writes and flushes at once, and that
        // flush must write (re-entering here), or it waits for a readiness that never comes.
        self.updateWritability()
        if self.flushedCount == 0, let pending = self.outputClosePromise {
            self.outputClosePromise = nil
            self.shutDownOutput(promise: pending)
        }
    }

    private func writeQueue() {
        while self.open && self.flushedCount > 0 && self.socketWritable {
            let count = min(self.flushedCount, Self.maxVectors)
            let vectors = self.loop.writeVectors
            var total = 0
            for i in 0..<count {
                let buffer = self.queue[self.queue.index(self.queue.startIndex, offsetBy: i)].buffer
                buffer.withUnsafeReadableBytes { bytes in
                    vectors[i] = iovec(
                        iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress),
                        iov_len: bytes.count
                    )
                }
                total += buffer.readableBytes
            }
            let written = cepoll_sendv(self.descriptor, vectors, Int32(count))
            if written < 0 {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK {
                    self.socketWritable = false
                    break
                }
                if code == EINTR { continue }
                self.fail(IOError(errnoCode: code, reason: "sendmsg"))
                return
            }
            self.consume(Int(written))
            if Int(written) < total { self.socketWritable = false }
        }
    }

    /// Drops `written` bytes from the front of the queue, completing the writes they finish.
    private func consume(_ written: Int) {
        var left = written
        var done: [EventLoopPromise<Void>] = []
        while left > 0 || (self.flushedCount > 0 && self.queue.first!.buffer.readableBytes == 0) {
            let size = self.queue.first!.buffer.readableBytes
            if size <= left {
                let write = self.queue.removeFirst()
                self.flushedCount -= 1
                self.bufferedBytes -= size
                left -= size
                if let promise = write.promise { done.append(promise) }
            } else {
                self.queue[self.queue.startIndex].buffer.moveReaderIndex(forwardBy: left)
                self.bufferedBytes -= left
                left = 0
            }
        }
        for promise in done { promise.succeed() }
    }

    private func shutDownOutput(promise: EventLoopPromise<Void>?) {
        if shutdown(self.descriptor, Int32(SHUT_WR)) != 0 {
            let code = errno
            promise?.fail(IOError(errnoCode: code, reason: "shutdown"))
            return
        }
        self.outputClosed = true
        promise?.succeed()
        self.pipeline.syncOperations.fireUserInboundEventTriggered(ChannelEvent.outputClosed)
    }

    /// An I/O error: reported to the pipeline, then the channel closes.
    private func fail(_ error: any Error) {
        self.pipeline.syncOperations.fireErrorCaught(error)
        if self.open { self.close0(error: error, mode: .all, promise: nil) }
    }

    private func closeAll(error: any Error, promise: EventLoopPromise<Void>?) {
        self.open = false
        self.activeFlag.store(false, ordering: .relaxed)
        if let registration = self.registration {
            if self.duplicated {
                self.loop.deregister(registration, removing: self.socket.number)
            } else {
                self.loop.deregister(registration)
            }
        }
        self.registration = nil
        self.socket.close()
        let writes = self.queue
        self.queue.removeAll()
        self.flushedCount = 0
        self.bufferedBytes = 0
        let pendingClose = self.outputClosePromise
        self.outputClosePromise = nil
        for write in writes { write.promise?.fail(error) }
        pendingClose??.fail(error)
        promise?.succeed()
        self.pipeline.syncOperations.fireChannelInactive()
        self.pipeline.syncOperations.fireChannelUnregistered()
        self.loop.executeOnLoop {
            self.removeHandlers(pipeline: self.pipeline)
            self.closePromise.succeed()
        }
    }
}

extension EpollStreamChannel: EpollSelectable {
    func ready(_ events: UInt32) {
        if events & (CEPOLL_ERR | CEPOLL_HUP) != 0 && events & CEPOLL_IN == 0 {
            // Reset or failed without data to read: report why.
            var code: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            _ = getsockopt(self.descriptor, SOL_SOCKET, SO_ERROR, &code, &length)
            if code != 0 {
                self.fail(IOError(errnoCode: code, reason: "socket"))
                return
            }
        }
        if events & (CEPOLL_OUT | CEPOLL_ERR | CEPOLL_HUP) != 0 {
            self.socketWritable = true
            if self.flushedCount > 0 { self.writeFlushed() }
        }
        if events & (CEPOLL_RDHUP | CEPOLL_HUP) != 0 { self.peerFinished = true }
        if events & (CEPOLL_IN | CEPOLL_RDHUP | CEPOLL_HUP | CEPOLL_ERR) != 0 && self.open {
            self.readable = true
            self.readAvailable()
        }
    }

    func runPass() {
        self.passRequested = false
        self.readAvailable()
    }

    func loopClosing() {
        if self.open { self.close0(error: EventLoopError.shutdown, mode: .all, promise: nil) }
    }
}

/// A value handed to the loop's thread and used only there.
struct UnsafeTransfer<Value>: @unchecked Sendable {
    var value: Value
    init(_ value: Value) { self.value = value }
}

/// A socket's own or its peer's address.
package enum SocketAddresses {
    package static func of(_ descriptor: Int32, peer: Bool) throws -> SocketAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                peer ? getpeername(descriptor, $0, &length) : getsockname(descriptor, $0, &length)
            }
        }
        guard result == 0 else { throw IOError(errnoCode: errno, reason: peer ? "getpeername" : "getsockname") }
        return try Self.address(storage)
    }

    package static func address(_ storage: sockaddr_storage) throws -> SocketAddress {
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafeBytes(of: storage) { SocketAddress($0.load(as: sockaddr_in.self)) }
        case AF_INET6:
            return withUnsafeBytes(of: storage) { SocketAddress($0.load(as: sockaddr_in6.self)) }
        default:
            throw ChannelError.operationUnsupported
        }
    }
}
