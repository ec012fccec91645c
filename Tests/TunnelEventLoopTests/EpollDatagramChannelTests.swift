import NIOConcurrencyHelpers
import NIOCore
import Testing
import TunnelEventLoop

#if canImport(Glibc)
import Glibc
#endif

struct EpollDatagramChannelTests {
    /// Sends every datagram back to where it came from.
    final class Reflector: ChannelInboundHandler {
        typealias InboundIn = AddressedEnvelope<ByteBuffer>
        typealias OutboundOut = AddressedEnvelope<ByteBuffer>
        func channelActive(context: ChannelHandlerContext) { context.read() }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            context.write(data, promise: nil)
        }
        func channelReadComplete(context: ChannelHandlerContext) {
            context.flush()
            context.read()
        }
    }

    /// Datagrams of every size up to 60000 bytes go out and come back whole, each with its source address.
    @Test func datagramsComeBackWholeToTheirSource() async throws {
        let loop = try EpollEventLoop()
        let channel = try await loop.submit {
            try EpollDatagramChannel.bind(to: try SocketAddress(ipAddress: "127.0.0.1", port: 0), on: loop) {
                try $0.syncOptions!.setOption(.autoRead, value: false)
                try $0.syncOptions!.setOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65600))
                try $0.pipeline.syncOperations.addHandler(Reflector())
            }
        }.get()
        let target = try #require(channel.localAddress)
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var reply = [UInt8](repeating: 0, count: 65536)
        for size in stride(from: 1, through: 60001, by: 2000) {
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ size) }
            let sent = payload.withUnsafeBytes { bytes in
                target.withSockAddr { sendto(fd, bytes.baseAddress, bytes.count, 0, $0, socklen_t($1)) }
            }
            #expect(sent == size)
            let received = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            #expect(received == size)
            #expect(Array(reply[0..<max(received, 0)]) == payload)
        }
        try await channel.close()
        #expect(!channel.isActive)
        try await loop.shutdownGracefully()
    }
}
