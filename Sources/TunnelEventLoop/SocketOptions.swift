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

    /// Applies `option`; says what the channel must act on. The channel's own options are told apart by
    /// comparing types, not by casting the option (a dynamic cast each): a stream socket sets four of them on
    /// every connection. Only a socket option needs the descriptor (`socketOption`).
    mutating func set<Option: ChannelOption>(_ option: Option, value: Option.Value) -> Change? {
        if Option.self == ChannelOptions.Types.AutoReadOption.self {
            let on = unsafeBitCast(value, to: Bool.self)
            defer { self.autoRead = on }
            return on && !self.autoRead ? .autoReadOn : Change.none
        } else if Option.self == ChannelOptions.Types.AllowRemoteHalfClosureOption.self {
            self.allowRemoteHalfClosure = unsafeBitCast(value, to: Bool.self)
        } else if Option.self == ChannelOptions.Types.MaxMessagesPerReadOption.self {
            self.maxMessagesPerRead = max(1, unsafeBitCast(value, to: UInt.self))
        } else if Option.self == ChannelOptions.Types.RecvAllocatorOption.self {
            self.receiveAllocator = unsafeBitCast(value, to: (any RecvByteBufferAllocator).self)
        } else if Option.self == ChannelOptions.Types.WriteBufferWaterMarkOption.self {
            self.waterMark = unsafeBitCast(value, to: ChannelOptions.Types.WriteBufferWaterMark.self)
            return .waterMark
        } else {
            return nil
        }
        return Change.none
    }

    /// Sets a socket option on `descriptor`; anything else is not supported.
    static func setSocketOption<Option: ChannelOption>(_ option: Option, value: Option.Value, descriptor: Int32) throws
    {
        guard let socketOption = option as? ChannelOptions.Types.SocketOption else {
            throw ChannelError.operationUnsupported
        }
        try Self.set(
            descriptor,
            level: Int32(socketOption.optionLevel.rawValue),
            name: Int32(socketOption.optionName.rawValue),
            value: value as! SocketOptionValue
        )
    }

    /// The value of one of the channel's own options (`bufferedBytes` answers `.bufferedWritableBytes`, asked
    /// after every flush of a stream), or nil for a socket option.
    func get<Option: ChannelOption>(_ option: Option, bufferedBytes: Int) -> Option.Value? {
        if Option.self == ChannelOptions.Types.BufferedWritableBytesOption.self {
            return unsafeBitCast(bufferedBytes, to: Option.Value.self)
        } else if Option.self == ChannelOptions.Types.AutoReadOption.self {
            return unsafeBitCast(self.autoRead, to: Option.Value.self)
        } else if Option.self == ChannelOptions.Types.AllowRemoteHalfClosureOption.self {
            return unsafeBitCast(self.allowRemoteHalfClosure, to: Option.Value.self)
        } else if Option.self == ChannelOptions.Types.MaxMessagesPerReadOption.self {
            return unsafeBitCast(self.maxMessagesPerRead, to: Option.Value.self)
        } else if Option.self == ChannelOptions.Types.RecvAllocatorOption.self {
            return unsafeBitCast(self.receiveAllocator, to: Option.Value.self)
        } else if Option.self == ChannelOptions.Types.WriteBufferWaterMarkOption.self {
            return unsafeBitCast(self.waterMark, to: Option.Value.self)
        }
        return nil
    }

    /// A socket option's value on `descriptor`; anything else is not supported.
    static func socketOption<Option: ChannelOption>(_ option: Option, descriptor: Int32) throws -> Option.Value {
        guard let socketOption = option as? ChannelOptions.Types.SocketOption else {
            throw ChannelError.operationUnsupported
        }
        let value: SocketOptionValue = try Self.get(
            descriptor,
            level: Int32(socketOption.optionLevel.rawValue),
            name: Int32(socketOption.optionName.rawValue)
        )
        return value as! Option.Value
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
        guard let change = self.options.set(option, value: value) else {
            try self.socket.use { try SocketOptions.setSocketOption(option, value: value, descriptor: $0) }
            return
        }
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
        if let value = self.options.get(option, bufferedBytes: self.bufferedBytes) { return value }
        return try self.socket.use { try SocketOptions.socketOption(option, descriptor: $0) }
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
