import Logging
import NIOCore
import NIOPosix
import TunnelEventLoop

#if canImport(Glibc)
import Glibc
#endif

/// Hands every datagram a UDP socket reads to `receive` (on the socket's event loop). ICMP errors such as
/// port unreachable are not fatal for an unconnected UDP socket and are ignored.
///
/// The socket reads in batches (up to `maxMessagesPerRead` datagrams per wake-up) and only while `wantsMore`
/// says so, asked after each batch: an owner whose queue is full stops the reads, the socket's buffer fills and
/// the kernel drops the rest of a flood (counted in `kernelDrops`) without this process spending anything on
/// it. The owner calls `channel.read()` when it wants datagrams again (a read already pending ignores it).
package final class DatagramReader: ChannelInboundHandler {
    package typealias InboundIn = AddressedEnvelope<ByteBuffer>
    private let receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>
    private let wantsMore: NIOLoopBound<() -> Bool>?

    package init(
        _ receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>,
        wantsMore: NIOLoopBound<() -> Bool>?
    ) {
        self.receive = receive
        self.wantsMore = wantsMore
    }

    package func channelActive(context: ChannelHandlerContext) {
        context.read()
        context.fireChannelActive()
    }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.receive.value(self.unwrapInboundIn(data))
    }

    package func channelReadComplete(context: ChannelHandlerContext) {
        if self.wantsMore?.value() ?? true { context.read() }
    }

    package func errorCaught(context: ChannelHandlerContext, error: any Error) {}

    /// Datagrams the kernel dropped because this socket's receive buffer was full (`SO_MEMINFO`, Linux), nil
    /// where that cannot be read. Call on the channel's event loop.
    package static func kernelDrops(of channel: any Channel) -> Int? {
        guard let provider = channel as? any SocketOptionProvider else { return nil }
        typealias MemoryInfo = (UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32)
        var drops: Int?
        let future: EventLoopFuture<MemoryInfo> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET),
            name: SocketOptionName(55)  // SO_MEMINFO; SK_MEMINFO_DROPS is its 9th value
        )
        future.assumeIsolated().whenSuccess { drops = Int($0.8) }
        return drops
    }

    /// A UDP socket bound to `host:port` on `loop` whose datagrams (up to `capacity` bytes each, so none is
    /// truncated) go to `receive`, read while `wantsMore` says so (always without one).
    package static func bind(
        host: String,
        port: Int,
        on loop: any EventLoop,
        capacity: Int = 65536 + 64,
        receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>,
        wantsMore: NIOLoopBound<() -> Bool>? = nil
    ) -> EventLoopFuture<any Channel> {
        if let own = loop as? EpollEventLoop {
            return own.submit {
                let address = try SocketAddress.makeAddressResolvingHost(host, port: port)
                return try EpollDatagramChannel.bind(to: address, on: own) { channel in
                    let options = channel.syncOptions!
                    try options.setOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: capacity))
                    try options.setOption(.maxMessagesPerRead, value: 16)
                    try options.setOption(.autoRead, value: false)
                    try options.setOption(.writeBufferWaterMark, value: .init(low: 512 << 10, high: 1 << 20))
                    try channel.pipeline.syncOperations.addHandler(DatagramReader(receive, wantsMore: wantsMore))
                }
            }
        }
        return DatagramBootstrap(group: loop)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: capacity))
            .channelOption(.maxMessagesPerRead, value: 16)
            .channelOption(.autoRead, value: false)
            // Owners write a burst and flush once (one sendmmsg): the burst must not make the socket unwritable.
            .channelOption(.writeBufferWaterMark, value: .init(low: 512 << 10, high: 1 << 20))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(DatagramReader(receive, wantsMore: wantsMore))
                }
            }
            .bind(host: host, port: port)
    }
}

/// What a UDP association moved, for the one line it logs when it ends.
package struct DatagramTally {
    package var sent = 0
    package var received = 0
    /// Dropped here: malformed, refused by policy or filtering, or no room or credit in the tunnel.
    package var dropped = 0

    package init() {}

    /// Logs the association's end, `what` naming it, with the kernel's drops at its `sockets` (read them before
    /// closing the sockets): at info when anything was dropped (a sender faster than the tunnel, or bad
    /// datagrams), else at debug; nothing when nothing moved.
    package func logEnd(_ what: String, sockets: [any Channel], logger: Logger) {
        let kernelDrops = sockets.compactMap(DatagramReader.kernelDrops(of:)).reduce(0, +)
        let dropped = self.dropped + kernelDrops
        guard self.sent + self.received + dropped > 0 else { return }
        logger.log(
            level: dropped > 0 ? .info : .debug,
            "\(what) ended: \(self.sent) datagrams sent, \(self.received) received, \(dropped) dropped (\(kernelDrops) of them by the kernel while the relay waited for the tunnel)"
        )
    }
}
