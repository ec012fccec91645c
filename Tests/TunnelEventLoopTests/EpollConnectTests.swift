import NIOConcurrencyHelpers
import NIOCore
import Testing
import TunnelEventLoop

#if canImport(Glibc)
import Glibc
#endif

struct EpollConnectTests {
    /// A blocking listening socket on loopback with the given backlog; its port.
    static func listener(backlog: Int32) throws -> (Int32, SocketAddress) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let any = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
        _ = any.withSockAddr { Glibc.bind(fd, $0, socklen_t($1)) }
        listen(fd, backlog)
        var storage = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return (fd, SocketAddress(storage))
    }

    /// Connections that fill a listener's accept queue (a listener of backlog 0, never accepting): a SYN after
    /// them is dropped and its connect stays pending.
    static func fillAcceptQueue(of address: SocketAddress) async throws -> [Int32] {
        var fillers: [Int32] = []
        for _ in 0..<4 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            _ = address.withSockAddr { Glibc.connect(fd, $0, socklen_t($1)) }
            fillers.append(fd)
        }
        try await Task.sleep(for: .milliseconds(100))
        return fillers
    }

    static func connect(
        to address: SocketAddress,
        timeout: TimeAmount = .seconds(5),
        on loop: EpollEventLoop
    ) async throws -> EpollStreamChannel {
        let promise = loop.makePromise(of: UnsafeChannel.self)
        loop.execute {
            EpollStreamChannel.connect(to: address, timeout: timeout, on: loop, initialize: { _ in }) { result in
                promise.completeWith(result.map(UnsafeChannel.init))
            }
        }
        return try await promise.futureResult.get().channel
    }

    struct UnsafeChannel: @unchecked Sendable { let channel: EpollStreamChannel }

    @Test func aConnectedChannelCarriesBytes() async throws {
        let loop = try EpollEventLoop()
        let (listening, address) = try Self.listener(backlog: 16)
        defer { close(listening) }
        let channel = try await Self.connect(to: address, on: loop)
        let accepted = accept(listening, nil, nil)
        defer { close(accepted) }
        #expect(channel.isActive)
        #expect(channel.remoteAddress == address)
        try await channel.writeAndFlush(ByteBuffer(string: "hello")).get()
        var bytes = [UInt8](repeating: 0, count: 5)
        #expect(bytes.withUnsafeMutableBytes { recv(accepted, $0.baseAddress, 5, Int32(MSG_WAITALL)) } == 5)
        #expect(String(decoding: bytes, as: UTF8.self) == "hello")
        try await channel.close()
        try await loop.shutdownGracefully()
    }

    /// Collects what a channel reads, until the peer's FIN.
    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let done: EventLoopPromise<String>
        var text = ""
        init(done: EventLoopPromise<String>) { self.done = done }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            self.text += String(buffer: self.unwrapInboundIn(data))
        }
        func channelInactive(context: ChannelHandlerContext) { self.done.succeed(self.text) }
    }

    /// The connect's socket is watched by epoll before it completes and the channel takes that watch over: what
    /// a peer sends at once (a server that speaks first) and its FIN must still reach the channel.
    @Test(.timeLimit(.minutes(1))) func aPeerThatSpeaksFirstIsHeard() async throws {
        let loop = try EpollEventLoop()
        let (listening, address) = try Self.listener(backlog: 16)
        defer { close(listening) }
        let step = ConditionLock(value: 0)
        for round in 0..<20 {
            let heard = loop.makePromise(of: String.self)
            let connected = loop.makePromise(of: UnsafeChannel.self)
            loop.execute {
                EpollStreamChannel.connect(
                    to: address,
                    timeout: .seconds(5),
                    on: loop,
                    initialize: { try $0.pipeline.syncOperations.addHandler(Collector(done: heard)) }
                ) { connected.completeWith($0.map(UnsafeChannel.init)) }
                // Every other round the loop is held until the peer has spoken and closed: epoll then reports
                // the connect's completion, the bytes and the FIN in one event.
                if round % 2 == 0 {
                    step.lock(whenValue: 1)
                    step.unlock(withValue: 0)
                }
            }
            let accepted = accept(listening, nil, nil)
            let banner = "220 round \(round) ready\r\n"
            #expect(send(accepted, banner, banner.utf8.count, 0) == banner.utf8.count)
            close(accepted)
            if round % 2 == 0 {
                step.lock()
                step.unlock(withValue: 1)
            }
            _ = try await connected.futureResult.get()
            #expect(try await heard.futureResult.get() == banner)
        }
        try await loop.shutdownGracefully()
    }

    @Test func aClosedPortIsRefused() async throws {
        let loop = try EpollEventLoop()
        let (listening, address) = try Self.listener(backlog: 1)
        close(listening)  // the port is free again: nobody listens
        await #expect {
            _ = try await Self.connect(to: address, on: loop)
        } throws: { error in
            (error as? IOError)?.errnoCode == ECONNREFUSED
        }
        try await loop.shutdownGracefully()
    }

    /// A listener whose queue is full drops the SYN: the connect stays pending and ends at its timeout.
    @Test func aConnectThatHangsEndsAtItsTimeout() async throws {
        let loop = try EpollEventLoop()
        let (listening, address) = try Self.listener(backlog: 0)
        defer { close(listening) }
        let fillers = try await Self.fillAcceptQueue(of: address)
        defer { for fd in fillers { close(fd) } }
        let start = NIODeadline.now()
        await #expect {
            _ = try await Self.connect(to: address, timeout: .milliseconds(300), on: loop)
        } throws: { error in
            if case .connectTimeout = error as? ChannelError { return true }
            return false
        }
        #expect(NIODeadline.now() - start >= .milliseconds(300))
        try await loop.shutdownGracefully()
    }

    /// The same connect completes once the listener makes room (the kernel retries the SYN): the socket turning
    /// writable ends the wait and the channel is handed over, active.
    @Test func aConnectThatWaitedCompletesWhenTheListenerMakesRoom() async throws {
        let loop = try EpollEventLoop()
        let (listening, address) = try Self.listener(backlog: 0)
        defer { close(listening) }
        var fillers = try await Self.fillAcceptQueue(of: address)
        defer { for fd in fillers { close(fd) } }
        async let connected = Self.connect(to: address, timeout: .seconds(10), on: loop)
        try await Task.sleep(for: .milliseconds(200))
        // Two queued connections exist (a backlog of 0 admits one or two): taking them makes room.
        for _ in 0..<2 { fillers.append(accept(listening, nil, nil)) }
        let channel = try await connected
        #expect(channel.isActive)
        try await channel.close()
        try await loop.shutdownGracefully()
    }
}
