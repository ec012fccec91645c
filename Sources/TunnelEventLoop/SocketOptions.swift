import Atomics
import NIOConcurrencyHelpers
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// The options both of our socket channels take, and `setsockopt`/`getsockopt` on their descriptor.
struct SocketOptions {
    var autoRead = true
    var maxMessagesPerRead: UInt = 4
    /// A fresh buffer per read, not NIOPosix's pool of the last ones: a pooled buffer stays with an idle
    /// socket (8.2 KB per idle stream on the client against 3.6 KB), while a read's allocation costs far less
    /// than the read itself (about 58 mallocs per connection either way).
    var receiveAllocator: any RecvByteBufferAllocator = AdaptiveRecvByteBufferAllocator()
    var waterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 32 << 10, high: 64 << 10)
    var allowRemoteHalfClosure = false

    enum Change { case none, autoReadOn, waterMark }

    /// Applies `option`; says what the channel must act on.
    mutating func set<Option: ChannelOption>(
        _ option: Option,
        value: Option.Value,
        descriptor: Int32
    ) throws
        -> Change
    {
        switch option {
        case is ChannelOptions.Types.AutoReadOption:
            let on = value as! Bool
            defer { self.autoRead = on }
            return on && !self.autoRead ? .autoReadOn : .none
        case is ChannelOptions.Types.AllowRemoteHalfClosureOption:
            self.allowRemoteHalfClosure = value as! Bool
        case is ChannelOptions.Types.MaxMessagesPerReadOption:
            self.maxMessagesPerRead = max(1, value as! UInt)
        case is ChannelOptions.Types.RecvAllocatorOption:
            self.receiveAllocator = value as! any RecvByteBufferAllocator
        case is ChannelOptions.Types.WriteBufferWaterMarkOption:
            self.waterMark = value as! ChannelOptions.Types.WriteBufferWaterMark
            return .waterMark
        case let socketOption as ChannelOptions.Types.SocketOption:
            try Self.set(
                descriptor,
                level: Int32(socketOption.optionLevel.rawValue),
                name: Int32(socketOption.optionName.rawValue),
                value: value as! SocketOptionValue
            )
        default:
            throw ChannelError.operationUnsupported
        }
        return .none
    }

    /// The value of `option`; `bufferedBytes` answers `.bufferedWritableBytes`.
    func get<Option: ChannelOption>(_ option: Option, descriptor: Int32, bufferedBytes: Int) throws -> Option.Value {
        switch option {
        case is ChannelOptions.Types.AutoReadOption: return self.autoRead as! Option.Value
        case is ChannelOptions.Types.AllowRemoteHalfClosureOption: return self.allowRemoteHalfClosure as! Option.Value
        case is ChannelOptions.Types.MaxMessagesPerReadOption: return self.maxMessagesPerRead as! Option.Value
        case is ChannelOptions.Types.RecvAllocatorOption: return self.receiveAllocator as! Option.Value
        case is ChannelOptions.Types.WriteBufferWaterMarkOption: return self.waterMark as! Option.Value
        case is ChannelOptions.Types.BufferedWritableBytesOption: return bufferedBytes as! Option.Value
        case let socketOption as ChannelOptions.Types.SocketOption:
            let value: SocketOptionValue = try Self.get(
                descriptor,
                level: Int32(socketOption.optionLevel.rawValue),
                name: Int32(socketOption.optionName.rawValue)
            )
            return value as! Option.Value
        default:
            throw ChannelError.operationUnsupported
        }
    }

    static func set<Value>(_ descriptor: Int32, level: Int32, name: Int32, value: Value) throws {
        let result = withUnsafeBytes(of: value) {
            setsockopt(descriptor, level, name, $0.baseAddress, socklen_t($0.count))
        }
        if result != 0 { throw IOError(errnoCode: errno, reason: "setsockopt") }
    }

    static func get<Value>(_ descriptor: Int32, level: Int32, name: Int32) throws -> Value {
        let storage = UnsafeMutableRawPointer.allocate(
            byteCount: MemoryLayout<Value>.size,
            alignment: MemoryLayout<Value>.alignment
        )
        defer { storage.deallocate() }
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<Value>.size)
        var length = socklen_t(MemoryLayout<Value>.size)
        guard getsockopt(descriptor, level, name, storage, &length) == 0 else {
            throw IOError(errnoCode: errno, reason: "getsockopt")
        }
        return storage.load(as: Value.self)
    }
}

/// A channel's descriptor as any thread may use it. Closing takes it away under the same lock, so a socket
/// option or an address asked for from another thread, or after the close, never reaches a descriptor number
/// the kernel has since handed to a newer socket: it gets `ChannelError.ioOnClosedChannel` instead. (The
/// loop's own reads and writes use the number directly: only the loop closes it.)
final class GuardedDescriptor: @unchecked Sendable {
    let number: Int32
    private let lock = NIOLock()
    private var closed = false
    private var addresses: (local: SocketAddress?, remote: SocketAddress?)

    init(_ number: Int32, remote: SocketAddress? = nil) {
        self.number = number
        self.addresses = (nil, remote)
    }

    func use<Result>(_ body: (Int32) throws -> Result) throws -> Result {
        try self.lock.withLock {
            guard !self.closed else { throw ChannelError.ioOnClosedChannel }
            return try body(self.number)
        }
    }

    /// The socket's own or its peer's address, looked up once.
    func address(peer: Bool) throws -> SocketAddress {
        try self.lock.withLock {
            if let known = peer ? self.addresses.remote : self.addresses.local { return known }
            guard !self.closed else { throw ChannelError.ioOnClosedChannel }
            let address = try SocketAddresses.of(self.number, peer: peer)
            if peer { self.addresses.remote = address } else { self.addresses.local = address }
            return address
        }
    }

    func close() {
        self.lock.withLock {
            guard !self.closed else { return }
            self.closed = true
            Glibc.close(self.number)
        }
    }
}

/// `SocketOptionProvider` for a channel of ours: the options are set on its descriptor at once.
protocol DescriptorOptionProvider: SocketOptionProvider {
    var socket: GuardedDescriptor { get }
    var loop: EpollEventLoop { get }
}

extension DescriptorOptionProvider {
    public func unsafeSetSocketOption<Value: Sendable>(
        level: SocketOptionLevel,
        name: SocketOptionName,
        value: Value
    ) -> EventLoopFuture<Void> {
        self.loop.makeCompletedFuture {
            try self.socket.use { try SocketOptions.set($0, level: Int32(level), name: Int32(name), value: value) }
        }
    }

    public func unsafeGetSocketOption<Value: Sendable>(
        level: SocketOptionLevel,
        name: SocketOptionName
    ) -> EventLoopFuture<Value> {
        self.loop.makeCompletedFuture {
            try self.socket.use { try SocketOptions.get($0, level: Int32(level), name: Int32(name)) }
        }
    }

    public func unsafeSetSocketOption<Value: Sendable>(
        level: NIOBSDSocket.OptionLevel,
        name: NIOBSDSocket.Option,
        value: Value
    ) -> EventLoopFuture<Void> {
        self.unsafeSetSocketOption(
            level: SocketOptionLevel(level.rawValue),
            name: SocketOptionName(name.rawValue),
            value: value
        )
    }

    public func unsafeGetSocketOption<Value: Sendable>(
        level: NIOBSDSocket.OptionLevel,
        name: NIOBSDSocket.Option
    ) -> EventLoopFuture<Value> {
        self.unsafeGetSocketOption(level: SocketOptionLevel(level.rawValue), name: SocketOptionName(name.rawValue))
    }
}

/// `setOption`/`getOption` as futures and `syncOptions`, for a channel whose options live on its loop.
protocol LoopOptionChannel: AnyObject, Sendable {
    var loop: EpollEventLoop { get }
    var socket: GuardedDescriptor { get }
    var options: SocketOptions { get set }
    var bufferedBytes: Int { get }
    var writableFlag: ManagedAtomic<Bool> { get }
    var pipeline: ChannelPipeline { get }
    /// Acts on an option just set (reads starting).
    func optionsChanged(_ change: SocketOptions.Change)
}

extension LoopOptionChannel {
    func setOption0<Option: ChannelOption>(_ option: Option, value: Option.Value) throws {
        self.loop.preconditionInEventLoop()
        let change = try self.socket.use { try self.options.set(option, value: value, descriptor: $0) }
        if change == .waterMark { self.updateWritability() }
        self.optionsChanged(change)
    }

    /// Follows the write buffer watermarks: unwritable above the high one, writable again below the low one.
    func updateWritability() {
        let writable = self.writableFlag.load(ordering: .relaxed)
        if !writable && self.bufferedBytes < self.options.waterMark.low {
            self.writableFlag.store(true, ordering: .relaxed)
            self.pipeline.syncOperations.fireChannelWritabilityChanged()
        } else if writable && self.bufferedBytes > self.options.waterMark.high {
            self.writableFlag.store(false, ordering: .relaxed)
            self.pipeline.syncOperations.fireChannelWritabilityChanged()
        }
    }

    func getOption0<Option: ChannelOption>(_ option: Option) throws -> Option.Value {
        self.loop.preconditionInEventLoop()
        return try self.socket.use { try self.options.get(option, descriptor: $0, bufferedBytes: self.bufferedBytes) }
    }

    func setOptionFuture<Option: ChannelOption>(_ option: Option, value: Option.Value) -> EventLoopFuture<Void> {
        if self.loop.inEventLoop {
            return self.loop.makeCompletedFuture { try self.setOption0(option, value: value) }
        }
        let box = UnsafeTransfer((option, value))
        return self.loop.submit { try self.setOption0(box.value.0, value: box.value.1) }
    }

    func getOptionFuture<Option: ChannelOption>(_ option: Option) -> EventLoopFuture<Option.Value> {
        if self.loop.inEventLoop {
            return self.loop.makeCompletedFuture { try self.getOption0(option) }
        }
        let box = UnsafeTransfer(option)
        return self.loop.submit { UnsafeTransfer(try self.getOption0(box.value)) }.map { $0.value }
    }
}

/// `syncOptions` of a channel of ours.
struct SynchronousOptions<Target: LoopOptionChannel>: NIOSynchronousChannelOptions {
    let channel: Target
    func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) throws {
        try self.channel.setOption0(option, value: value)
    }
    func getOption<Option: ChannelOption>(_ option: Option) throws -> Option.Value {
        try self.channel.getOption0(option)
    }
}
