import NIOCore
import NIOPosix

/// Hands every datagram a UDP socket reads to `receive` (on the socket's event loop). ICMP errors such as
/// port unreachable are not fatal for an unconnected UDP socket and are ignored.
package final class DatagramReader: ChannelInboundHandler {
    package typealias InboundIn = AddressedEnvelope<ByteBuffer>
    private let receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>

    package init(_ receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>) {
        self.receive = receive
    }

    package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.receive.value(self.unwrapInboundIn(data))
    }

    package func errorCaught(context: ChannelHandlerContext, error: any Error) {}

    /// A UDP socket bound to `host:port` on `loop` whose datagrams (up to `capacity` bytes each, so none is
    /// truncated) go to `receive`.
    package static func bind(
        host: String,
        port: Int,
        on loop: any EventLoop,
        capacity: Int = 65536 + 64,
        receive: NIOLoopBound<(AddressedEnvelope<ByteBuffer>) -> Void>
    ) -> EventLoopFuture<any Channel> {
        DatagramBootstrap(group: loop)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: capacity))
            .channelOption(.maxMessagesPerRead, value: 16)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(DatagramReader(receive))
                }
            }
            .bind(host: host, port: port)
    }
}
