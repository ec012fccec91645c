import Atomics
import CEpoll
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// An unconnected UDP socket as a NIOCore `Channel` on an `EpollEventLoop`, reading and writing
/// `AddressedEnvelope<ByteBuffer>` as NIOPosix's datagram channel does: reads while asked (or always, with
/// auto-read), up to `maxMessagesPerRead` datagrams per turn, each into a buffer of the receive allocator
/// (a fixed size at least the largest datagram, or it is cut); writes queued until flushed, one `sendto` each,
/// the rest waiting while the socket is full. An error sending one datagram (an ICMP error reported on an
/// unconnected socket, say) drops that datagram only and is reported to the pipeline; the channel stays open.
public final class EpollDatagramChannel: Channel, ChannelCore, DescriptorOptionProvider, LoopOptionChannel,
    @unchecked Sendable
{
    public let loop: EpollEventLoop
    public var eventLoop: any EventLoop { self.loop }
    public let allocator = ByteBufferAllocator()
    public var parent: (any Channel)? { nil }
    public var _channelCore: any ChannelCore { self }
    public var pipeline: ChannelPipeline { self.pipelineStorage }
    public var closeFuture: EventLoopFuture<Void> { self.closePromise.futureResult }
    public var descriptor: Int32 { self.socket.number }
    let socket: GuardedDescriptor
    public let localAddress: SocketAddress?
    public var remoteAddress: SocketAddress? { nil }

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
    private var passRequested = false
    private var socketWritable = true
    private var queue = CircularBuffer<(AddressedEnvelope<ByteBuffer>, EventLoopPromise<Void>?)>(initialCapacity: 16)
    private var flushedCount = 0
    private(set) var bufferedBytes = 0

    private init(descriptor: Int32, loop: EpollEventLoop, local: SocketAddress) {
        self.socket = GuardedDescriptor(descriptor)
        self.loop = loop
        self.localAddress = local
        self.closePromise = loop.makePromise()
        self.pipelineStorage = ChannelPipeline(channel: self)
    }

    /// A UDP socket bound to `address` on `loop`, set up by `initialize` (options, handlers) and then
    /// activated. On the loop.
    public static func bind(
        to address: SocketAddress,
        on loop: EpollEventLoop,
        initialize: (EpollDatagramChannel) throws -> Void
    ) throws -> EpollDatagramChannel {
        loop.preconditionInEventLoop()
        let descriptor = cepoll_datagram_socket(Int32(address.protocol.rawValue))
        guard descriptor >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        let channel: EpollDatagramChannel
        do {
            let bound = address.withSockAddr { Glibc.bind(descriptor, $0, socklen_t($1)) }
            guard bound == 0 else { throw IOError(errnoCode: errno, reason: "bind \(address)") }
            channel = EpollDatagramChannel(
                descriptor: descriptor,
                loop: loop,
                local: try SocketAddresses.of(descriptor, peer: false)
            )
        } catch {
            Glibc.close(descriptor)
            throw error
        }
        do {
            try initialize(channel)
            channel.registration = try loop.register(channel, descriptor: descriptor, events: CEPOLL_IN | CEPOLL_OUT)
        } catch {
            channel.close0(error: error, mode: .all, promise: nil)
            throw error
        }
        channel.activeFlag.store(true, ordering: .relaxed)
        channel.pipeline.syncOperations.fireChannelRegistered()
        channel.pipeline.syncOperations.fireChannelActive()
        if channel.options.autoRead && channel.open { channel.read0() }
        return channel
    }

    // MARK: Channel

    public var isActive: Bool { self.activeFlag.load(ordering: .relaxed) }
    public var isWritable: Bool { self.writableFlag.load(ordering: .relaxed) }
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

    public func localAddress0() throws -> SocketAddress {
        guard let address = self.localAddress else { throw ChannelError.unknownLocalAddress }
        return address
    }

    public func remoteAddress0() throws -> SocketAddress { throw ChannelError.operationUnsupported }
    public func register0(promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }
    public func registerAlreadyConfigured0(promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }
    public func bind0(to: SocketAddress, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }
    public func connect0(to: SocketAddress, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }
    public func triggerUserOutboundEvent0(_ event: Any, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }
    public func channelRead0(_ data: NIOAny) {}
    public func errorCaught0(error: any Error) {}

    public func write0(_ data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard self.open else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        let envelope = self.unwrapData(data, as: AddressedEnvelope<ByteBuffer>.self)
        self.queue.append((envelope, promise))
        self.bufferedBytes += envelope.data.readableBytes
        self.updateWritability()
    }

    public func flush0() {
        guard self.open else { return }
        self.flushedCount = self.queue.count
        if self.socketWritable { self.writeFlushed() }
    }

    public func read0() {
        guard self.open else { return }
        self.readPending = true
        if self.readable && !self.passRequested {
            self.passRequested = true
            self.loop.requestPass(for: self)
        }
    }

    public func close0(error: any Error, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard self.open else {
            promise?.fail(ChannelError.alreadyClosed)
            return
        }
        guard mode == .all else {
            promise?.fail(ChannelError.operationUnsupported)
            return
        }
        self.open = false
        self.activeFlag.store(false, ordering: .relaxed)
        if let registration = self.registration { self.loop.deregister(registration) }
        self.registration = nil
        self.socket.close()
        let writes = self.queue
        self.queue.removeAll()
        self.flushedCount = 0
        self.bufferedBytes = 0
        for (_, writePromise) in writes { writePromise?.fail(error) }
        promise?.succeed()
        self.pipeline.syncOperations.fireChannelInactive()
        self.pipeline.syncOperations.fireChannelUnregistered()
        self.loop.executeOnLoop {
            self.removeHandlers(pipeline: self.pipeline)
            self.closePromise.succeed()
        }
    }

    // MARK: I/O

    private func readAvailable() {
        guard self.open, self.readable, self.readPending || self.options.autoRead else { return }
        var reads: UInt = 0
        while reads < self.options.maxMessagesPerRead && self.open {
            var buffer = self.options.receiveAllocator.buffer(allocator: self.allocator)
            var storage = sockaddr_storage()
            var failure: Int32 = 0
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 0) { pointer -> Int in
                var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                let result = withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        recvfrom(self.descriptor, pointer.baseAddress, pointer.count, 0, $0, &length)
                    }
                }
                if result < 0 { failure = errno }
                return max(result, 0)
            }
            if failure == EAGAIN || failure == EWOULDBLOCK {
                self.readable = false
                break
            }
            if failure == EINTR { continue }
            if failure != 0 {
                // An ICMP error queued on the socket: not fatal for an unconnected socket.
                self.pipeline.syncOperations.fireErrorCaught(IOError(errnoCode: failure, reason: "recvfrom"))
                continue
            }
            _ = self.options.receiveAllocator.record(actualReadBytes: count)
            self.readPending = false
            reads += 1
            guard let source = try? SocketAddresses.address(storage) else { continue }
            self.pipeline.syncOperations.fireChannelRead(
                NIOAny(AddressedEnvelope(remoteAddress: source, data: buffer))
            )
        }
        if reads > 0 && self.open { self.pipeline.syncOperations.fireChannelReadComplete() }
        if self.open && self.readable && (self.readPending || self.options.autoRead) && !self.passRequested {
            self.passRequested = true
            self.loop.requestPass(for: self)
        }
    }

    private func writeFlushed() {
        var done: [(EventLoopPromise<Void>?, (any Error)?)] = []
        while self.open && self.flushedCount > 0 {
            let (envelope, promise) = self.queue.first!
            let sent = envelope.data.withUnsafeReadableBytes { bytes in
                envelope.remoteAddress.withSockAddr { address, length in
                    sendto(
                        self.descriptor,
                        bytes.baseAddress,
                        bytes.count,
                        Int32(MSG_NOSIGNAL),
                        address,
                        socklen_t(length)
                    )
                }
            }
            if sent < 0 {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK || code == ENOBUFS {
                    self.socketWritable = false
                    break
                }
                if code == EINTR { continue }
                done.append((promise, IOError(errnoCode: code, reason: "sendto")))
            } else {
                done.append((promise, nil))
            }
            _ = self.queue.removeFirst()
            self.flushedCount -= 1
            self.bufferedBytes -= envelope.data.readableBytes
        }
        self.updateWritability()
        for (promise, error) in done {
            if let error {
                promise?.fail(error)
                self.pipeline.syncOperations.fireErrorCaught(error)
            } else {
                promise?.succeed()
            }
        }
    }

}

extension EpollDatagramChannel: EpollSelectable {
    func ready(_ events: UInt32) {
        if events & (CEPOLL_OUT | CEPOLL_ERR) != 0 {
            self.socketWritable = true
            if self.flushedCount > 0 { self.writeFlushed() }
        }
        if events & (CEPOLL_IN | CEPOLL_ERR) != 0 && self.open {
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
