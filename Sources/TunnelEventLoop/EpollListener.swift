import CEpoll
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// A listening TCP socket on an `EpollEventLoop`: each accepted connection becomes an `EpollStreamChannel`,
/// set up by `initialize` (options, handlers) on its loop and then activated. Its loop is the listener's, or,
/// with `children`, the group's loops in turn (the server: one per core).
public final class EpollListener: @unchecked Sendable {
    public typealias Initializer = (EpollStreamChannel) throws -> Void

    public let loop: EpollEventLoop
    /// The bound address (the port chosen when 0 was asked for).
    public let localAddress: SocketAddress
    private let descriptor: Int32
    private let initialize: Initializer
    private let children: EpollEventLoopGroup?
    private var registration: EpollEventLoop.Registration?
    private var open = true
    private var retry: Scheduled<Void>?
    private let closed: EventLoopPromise<Void>
    /// Connections accepted per readiness before the loop's other work gets a turn.
    private static let acceptsPerPass = 64

    private init(
        loop: EpollEventLoop,
        descriptor: Int32,
        address: SocketAddress,
        children: EpollEventLoopGroup?,
        initialize: @escaping Initializer
    ) {
        self.loop = loop
        self.descriptor = descriptor
        self.localAddress = address
        self.children = children
        self.initialize = initialize
        self.closed = loop.makePromise()
    }

    /// Binds `host:port` (SO_REUSEADDR, TCP_NODELAY, `backlog`) and accepts on `loop`; the connections run on `loop`, or on
    /// the loops of `children` in turn.
    public static func bind(
        host: String,
        port: Int,
        backlog: Int32 = 1024,
        on loop: EpollEventLoop,
        children: EpollEventLoopGroup? = nil,
        initialize: @escaping Initializer
    ) async throws -> EpollListener {
        let address = try SocketAddress(ipAddress: host, port: port)
        let box = UnsafeTransfer(initialize)
        return try await loop.submit {
            let descriptor = cepoll_stream_socket(Int32(address.protocol.rawValue))
            guard descriptor >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
            do {
                var one: Int32 = 1
                _ = setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
                // Nagle's algorithm off, as NIO's server bootstrap sets: accepted sockets inherit it from here.
                _ = setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                let bound = address.withSockAddr { Glibc.bind(descriptor, $0, socklen_t($1)) }
                guard bound == 0 else { throw IOError(errnoCode: errno, reason: "bind \(address)") }
                guard listen(descriptor, backlog) == 0 else { throw IOError(errnoCode: errno, reason: "listen") }
                let actual = try SocketAddresses.of(descriptor, peer: false)
                let listener = EpollListener(
                    loop: loop,
                    descriptor: descriptor,
                    address: actual,
                    children: children,
                    initialize: box.value
                )
                listener.registration = try loop.register(listener, descriptor: descriptor, events: CEPOLL_IN)
                return UnsafeTransfer(listener)
            } catch {
                Glibc.close(descriptor)
                throw error
            }
        }.get().value
    }

    /// Stops accepting and closes the socket; connections already accepted stay.
    public func close() async {
        try? await self.loop.submit { self.close0() }.get()
    }

    private func close0() {
        guard self.open else { return }
        self.open = false
        self.retry?.cancel()
        if let registration = self.registration { self.loop.deregister(registration) }
        Glibc.close(self.descriptor)
        self.closed.succeed()
    }

    private func acceptAvailable() {
        var accepted = 0
        while self.open && accepted < Self.acceptsPerPass {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let connection = cepoll_accept(self.descriptor, &storage, &length)
            if connection < 0 {
                switch errno {
                case EAGAIN, EWOULDBLOCK:
                    return
                case EINTR, ECONNABORTED, EPROTO:
                    continue
                default:
                    // Out of descriptors or memory: the pending connections wait in the backlog; try again soon
                    // (edge-triggered readiness will not report them again).
                    self.retry = self.loop.assumeIsolated().scheduleTask(in: .milliseconds(50)) {
                        self.acceptAvailable()
                    }
                    return
                }
            }
            accepted += 1
            let remote = try? SocketAddresses.address(storage)
            let target = self.children?.nextLoop() ?? self.loop
            if target === self.loop {
                Self.start(connection, remote: remote, on: target, initialize: self.initialize)
            } else {
                // Handed to its own loop. Should that loop be stopping, the work is dropped and the process is
                // about to exit with it.
                let initialize = UnsafeTransfer(self.initialize)
                target.execute {
                    Self.start(connection, remote: remote, on: target, initialize: initialize.value)
                }
            }
        }
        if self.open { self.loop.requestPass(for: self) }
    }

    /// Makes the channel of an accepted connection on its loop, sets it up and activates it.
    private static func start(
        _ descriptor: Int32,
        remote: SocketAddress?,
        on loop: EpollEventLoop,
        initialize: Initializer
    ) {
        let channel = EpollStreamChannel(descriptor: descriptor, loop: loop, remote: remote)
        do {
            try initialize(channel)
        } catch {
            channel.close0(error: error, mode: .all, promise: nil)
            return
        }
        channel.activate()
    }
}

extension EpollListener: EpollSelectable {
    func ready(_ events: UInt32) { self.acceptAvailable() }
    func runPass() { self.acceptAvailable() }
    func loopClosing() { self.close0() }
}
