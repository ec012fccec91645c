import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// The options both of our socket channels take, and `setsockopt`/`getsockopt` on their descriptor.
struct SocketOptions {
    var autoRead = true
    var maxMessagesPerRead: UInt = 4
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

/// `SocketOptionProvider` for a channel of ours: the options are set on its descriptor at once.
protocol DescriptorOptionProvider: SocketOptionProvider {
    var descriptor: Int32 { get }
    var loop: EpollEventLoop { get }
}

extension DescriptorOptionProvider {
    public func unsafeSetSocketOption<Value: Sendable>(
        level: SocketOptionLevel,
        name: SocketOptionName,
        value: Value
    ) -> EventLoopFuture<Void> {
        self.loop.makeCompletedFuture {
            try SocketOptions.set(self.descriptor, level: Int32(level), name: Int32(name), value: value)
        }
    }

    public func unsafeGetSocketOption<Value: Sendable>(
        level: SocketOptionLevel,
        name: SocketOptionName
    ) -> EventLoopFuture<Value> {
        self.loop.makeCompletedFuture {
            try SocketOptions.get(self.descriptor, level: Int32(level), name: Int32(name))
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
    var descriptor: Int32 { get }
    var options: SocketOptions { get set }
    var bufferedBytes: Int { get }
    /// Acts on an option just set (reads starting, writability).
    func optionsChanged(_ change: SocketOptions.Change)
}

extension LoopOptionChannel {
    func setOption0<Option: ChannelOption>(_ option: Option, value: Option.Value) throws {
        self.loop.preconditionInEventLoop()
        self.optionsChanged(try self.options.set(option, value: value, descriptor: self.descriptor))
    }

    func getOption0<Option: ChannelOption>(_ option: Option) throws -> Option.Value {
        self.loop.preconditionInEventLoop()
        return try self.options.get(option, descriptor: self.descriptor, bufferedBytes: self.bufferedBytes)
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
