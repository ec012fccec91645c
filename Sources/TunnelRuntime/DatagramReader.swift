import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Hands every datagram a UDP socket reads to `receive` (on the socket's event loop). ICMP errors such as
/// port unreachable are not fatal for an unconnected UDP socket and are ignored.
///
/// The socket reads in batches (up to `maxMessagesPerRead` datagrams per wake-up) and only while `wantsMore`
/// says so, asked after each batch: an owner whose queue is full stops the reads, the socket's buffer fills and
/// the kernel drops the rest of a flood (counted in `kernelDrops`) without this process spending anything on
/// it. The owner calls `resume` when it wants datagrams again.
package final class DatagramReader: ChannelInboundHandler {
    package typealias InboundIn = AddressedEnvelope<ByteBuffer>
    private let receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>
    private let wantsMore: NIOLoopBound<() -> Bool>?
    private var context: ChannelHandlerContext?
    /// Reads stopped after a batch because the owner wanted no more.
    private var paused = false

    package init(
        _ receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>,
        wantsMore: NIOLoopBound<() -> Bool>?
    ) {
        self.receive = receive
        self.wantsMore = wantsMore
    }

    package func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    package func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    package func channelActive(context: ChannelHandlerContext) {
        context.read()
        context.fireChannelActive()
    }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.receive.value(self.unwrapInboundIn(data))
    }

    package func channelReadComplete(context: ChannelHandlerContext) {
        if self.wantsMore?.value() ?? true {
            context.read()
        } else {
            self.paused = true
        }
    }

    /// Reads again after the owner's `wantsMore` stopped them (does nothing while reads go on).
    package func resume() {
        guard self.paused, let context = self.context else { return }
        self.paused = false
        context.read()
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
        future.whenSuccess { drops = Int($0.8) }
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
        DatagramBootstrap(group: loop)
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
