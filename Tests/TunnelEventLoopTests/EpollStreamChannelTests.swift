import NIOConcurrencyHelpers
import NIOCore
import Testing
import TunnelEventLoop
import TunnelTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Real sockets on loopback: a listener on our loop, and a plain blocking socket as the peer.
struct EpollStreamChannelTests {
    /// Sends back what it reads; on the peer's end of input, finishes its own output.
    final class Echo: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let events: NIOLockedValueBox<[String]>
        init(events: NIOLockedValueBox<[String]>) { self.events = events }
        func channelActive(context: ChannelHandlerContext) {
            self.events.withLockedValue { $0.append("active") }
            context.read()
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            context.write(data, promise: nil)
        }
        func channelReadComplete(context: ChannelHandlerContext) {
            context.flush()
            context.read()
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let event = event as? ChannelEvent, event == .inputClosed {
                self.events.withLockedValue { $0.append("inputClosed") }
                context.close(mode: .output, promise: nil)
            }
        }
        func channelInactive(context: ChannelHandlerContext) { self.events.withLockedValue { $0.append("inactive") } }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            self.events.withLockedValue { $0.append("error") }
        }
    }

    struct Fixture {
        let loop: EpollEventLoop
        let listener: EpollListener
        let channels: NIOLockedValueBox<[EpollStreamChannel]>

        init(autoRead: Bool = false, handler: @escaping @Sendable () -> any ChannelHandler) async throws {
            let loop = try EpollEventLoop()
            let channels = NIOLockedValueBox<[EpollStreamChannel]>([])
            self.loop = loop
            self.channels = channels
            self.listener = try await EpollListener.bind(host: "127.0.0.1", port: 0, on: loop) { channel in
                try channel.syncOptions!.setOption(.autoRead, value: autoRead)
                try channel.syncOptions!.setOption(.allowRemoteHalfClosure, value: true)
                try channel.pipeline.syncOperations.addHandler(handler())
                channels.withLockedValue { $0.append(channel) }
            }
        }

        /// A blocking socket connected to the listener.
        func connect() throws -> Int32 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            let result = self.listener.localAddress.withSockAddr { Glibc.connect(fd, $0, socklen_t($1)) }
            guard result == 0 else { throw IOError(errnoCode: errno, reason: "connect") }
            return fd
        }

        func stop() async throws {
            await self.listener.close()
            try await self.loop.shutdownGracefully()
        }
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            precondition(n > 0, "write failed: \(errno)")
            offset += n
        }
    }

    /// Reads until end of input.
    static func receiveAll(_ fd: Int32) -> [UInt8] {
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { return result }
            result += chunk[0..<n]
        }
    }

    /// More than any socket buffer and watermark: partial writes, writability and reads that stop (auto-read off)
    /// all happen, and every byte comes back in order, then the half-close travels both ways.
    @Test func echoesTensOfMegabytesAndHalfClosesCleanly() async throws {
        let events = NIOLockedValueBox<[String]>([])
        let fixture = try await Fixture { Echo(events: events) }
        let fd = try fixture.connect()
        defer { close(fd) }
        var generator = SplitMix64(seed: 7)
        let payload = (0..<(24 << 20)).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        let writer = Thread.detach {
            Self.send(fd, payload)
            shutdown(fd, Int32(SHUT_WR))
        }
        let echoed = Self.receiveAll(fd)
        writer.join()
        #expect(echoed.count == payload.count)
        #expect(echoed == payload)
        try await Task.sleep(for: .milliseconds(50))
        #expect(events.withLockedValue { $0 } == ["active", "inputClosed"])
        try await fixture.stop()
        #expect(events.withLockedValue { $0 }.last == "inactive")
    }

    /// With auto-read off nothing is read until the handler asks.
    final class ReadsOnlyWhenAsked: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let reads: NIOLockedValueBox<Int>
        init(reads: NIOLockedValueBox<Int>) { self.reads = reads }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            self.reads.withLockedValue { $0 += self.unwrapInboundIn(data).readableBytes }
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let event = event as? ChannelEvent, event == .inputClosed {
                self.reads.withLockedValue { $0 += 1_000_000 }
            }
        }
    }

    /// Data and the end of input arrive while the handler is not reading: both are delivered without a
    /// `read()` (as NIOPosix does, so a handler waiting with reads off learns that its peer left), the data
    /// in one short read and the end after it, although edge-triggered readiness announced both at once.
    @Test func thePeersEndIsReadWithoutBeingAsked() async throws {
        let reads = NIOLockedValueBox(0)
        let fixture = try await Fixture { ReadsOnlyWhenAsked(reads: reads) }
        let fd = try fixture.connect()
        defer { close(fd) }
        Self.send(fd, Array(repeating: 1, count: 1000))
        try await Task.sleep(for: .milliseconds(100))
        #expect(reads.withLockedValue { $0 } == 0)
        shutdown(fd, Int32(SHUT_WR))
        try await Task.sleep(for: .milliseconds(100))
        #expect(reads.withLockedValue { $0 } == 1_001_000)
        try await fixture.stop()
    }

    @Test func withAutoReadOffNothingIsReadUntilAsked() async throws {
        let reads = NIOLockedValueBox(0)
        let fixture = try await Fixture { ReadsOnlyWhenAsked(reads: reads) }
        let fd = try fixture.connect()
        defer { close(fd) }
        Self.send(fd, Array(repeating: 1, count: 1000))
        try await Task.sleep(for: .milliseconds(100))
        #expect(reads.withLockedValue { $0 } == 0)
        let channel = try #require(fixture.channels.withLockedValue { $0.first })
        channel.read()
        try await Task.sleep(for: .milliseconds(100))
        #expect(reads.withLockedValue { $0 } == 1000)
        try await fixture.stop()
    }

    /// A peer that resets the connection closes the channel with an error, and the close future completes.
    @Test func aResetClosesTheChannel() async throws {
        let events = NIOLockedValueBox<[String]>([])
        let fixture = try await Fixture(autoRead: true) { Echo(events: events) }
        let fd = try fixture.connect()
        try await Task.sleep(for: .milliseconds(50))
        let channel = try #require(fixture.channels.withLockedValue { $0.first })
        var linger = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
        close(fd)
        try await channel.closeFuture.get()
        #expect(!channel.isActive)
        #expect(events.withLockedValue { $0 }.contains("inactive"))
        try await fixture.stop()
    }

    /// Once closed, a channel's socket options are refused as the channel's, never tried on the descriptor
    /// number (which the kernel may since have given to a newer socket); its addresses stay the ones it had.
    @Test func aClosedChannelRefusesSocketOptionsAndKeepsItsAddresses() async throws {
        let events = NIOLockedValueBox<[String]>([])
        let fixture = try await Fixture(autoRead: true) { Echo(events: events) }
        let fd = try fixture.connect()
        defer { close(fd) }
        try await Task.sleep(for: .milliseconds(50))
        let channel = try #require(fixture.channels.withLockedValue { $0.first })
        let local = try #require(channel.localAddress)
        try await channel.close()
        let set: EventLoopFuture<Void> = channel.unsafeSetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET),
            name: SocketOptionName(SO_RCVBUF),
            value: Int32(4096)
        )
        await #expect(throws: ChannelError.ioOnClosedChannel) { try await set.get() }
        await #expect(throws: ChannelError.ioOnClosedChannel) {
            try await channel.setOption(.socketOption(.so_keepalive), value: 1).get()
        }
        #expect(channel.localAddress == local)
        #expect(channel.remoteAddress != nil)
        try await fixture.stop()
    }

    /// Writes beyond the high watermark turn the channel unwritable; once the peer reads them it is writable again.
    final class Writer: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let changes: NIOLockedValueBox<[Bool]>
        init(changes: NIOLockedValueBox<[Bool]>) { self.changes = changes }
        func channelActive(context: ChannelHandlerContext) {
            let chunk = context.channel.allocator.buffer(repeating: 7, count: 1 << 20)
            for _ in 0..<8 { context.write(self.wrapOutboundOut(chunk), promise: nil) }
            context.flush()
            context.close(mode: .output, promise: nil)
        }
        func channelWritabilityChanged(context: ChannelHandlerContext) {
            self.changes.withLockedValue { $0.append(context.channel.isWritable) }
        }
    }

    @Test func writabilityFollowsTheWatermarks() async throws {
        let changes = NIOLockedValueBox<[Bool]>([])
        let fixture = try await Fixture { Writer(changes: changes) }
        let fd = try fixture.connect()
        defer { close(fd) }
        try await Task.sleep(for: .milliseconds(50))
        let received = Self.receiveAll(fd)
        #expect(received.count == 8 << 20)
        #expect(changes.withLockedValue { $0 } == [false, true])
        try await fixture.stop()
    }
}

extension EpollStreamChannelTests {
    /// Writes in rounds, as the tunnel connection does: while writable, 256 KiB a write, until `total` bytes;
    /// the next round when the channel turns writable again, which happens inside the channel's own write pass.
    final class WritesWhenWritable: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let total: Int
        var sent = 0
        init(total: Int) { self.total = total }
        func channelActive(context: ChannelHandlerContext) { self.produce(context: context) }
        func channelWritabilityChanged(context: ChannelHandlerContext) {
            if context.channel.isWritable { self.produce(context: context) }
        }
        func produce(context: ChannelHandlerContext) {
            while self.sent < self.total && context.channel.isWritable {
                let size = min(256 << 10, self.total - self.sent)
                let chunk = context.channel.allocator.buffer(repeating: UInt8(self.sent >> 18 & 0xFF), count: size)
                self.sent += size
                context.writeAndFlush(self.wrapOutboundOut(chunk), promise: nil)
            }
            if self.sent == self.total { context.close(mode: .output, promise: nil) }
        }
    }

    /// What a handler writes and flushes when told the channel is writable again (the channel is then still in
    /// its write pass) goes out too: the tunnel's output once stalled with a flushed write queued and the socket
    /// writable (a resumed session's replay, beyond the high watermark).
    @Test func writesMadeWhenWritabilityReturnsGoOut() async throws {
        let total = 32 << 20
        let fixture = try await Fixture { WritesWhenWritable(total: total) }
        let fd = try fixture.connect()
        defer { close(fd) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let received = Self.receiveAll(fd)
        #expect(received.count == total)
        try await fixture.stop()
    }
}

/// A plain thread for blocking socket calls in a test.
final class Thread: @unchecked Sendable {
    private var handle = pthread_t()
    private let body: () -> Void

    private init(_ body: @escaping () -> Void) { self.body = body }

    static func detach(_ body: @escaping () -> Void) -> Thread {
        let thread = Thread(body)
        let box = Unmanaged.passRetained(thread)
        pthread_create(
            &thread.handle,
            nil,
            { argument in
                Unmanaged<Thread>.fromOpaque(argument!).takeRetainedValue().body()
                return nil
            },
            box.toOpaque()
        )
        return thread
    }

    func join() { pthread_join(self.handle, nil) }
}
