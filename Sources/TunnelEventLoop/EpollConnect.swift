import CEpoll
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

extension EpollStreamChannel {
    /// Connects a new socket (TCP_NODELAY, as NIO's bootstrap sets) to `address` on `loop`, then hands it to
    /// `initialize` (options, handlers) and activates it; `done` gets the active channel, or the connect's error
    /// (an `IOError` with its errno), or `ChannelError.connectTimeout` once `timeout` passed. A connect to this
    /// host usually ends within connect(2) itself; one that does not waits for the socket to turn writable.
    /// On the loop.
    public static func connect(
        to address: SocketAddress,
        timeout: TimeAmount,
        on loop: EpollEventLoop,
        initialize: @escaping (EpollStreamChannel) throws -> Void,
        done: @escaping (Result<EpollStreamChannel, any Error>) -> Void
    ) {
        loop.preconditionInEventLoop()
        let descriptor = cepoll_stream_socket(Int32(address.protocol.rawValue))
        guard descriptor >= 0 else {
            done(.failure(IOError(errnoCode: errno, reason: "socket")))
            return
        }
        var one: Int32 = 1
        _ = setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        let result = address.withSockAddr { Glibc.connect(descriptor, $0, socklen_t($1)) }
        let code = result == 0 ? 0 : errno
        switch code {
        case 0:
            done(Self.adopt(descriptor, on: loop, initialize: initialize))
        case EINPROGRESS, EINTR:
            let pending = PendingConnect(descriptor: descriptor, loop: loop) { outcome in
                switch outcome {
                case .success(let watch):
                    done(Self.adopt(descriptor, on: loop, watched: watch, initialize: initialize))
                case .failure(let error): done(.failure(error))
                }
            }
            pending.start(timeout: timeout)
        default:
            Glibc.close(descriptor)
            done(.failure(IOError(errnoCode: code, reason: "connect")))
        }
    }

    /// Takes over a connected socket on `loop` (on the loop): `initialize` sets it up (options, handlers), then
    /// it is activated. On failure the socket is closed.
    public static func adopt(
        _ descriptor: Int32,
        on loop: EpollEventLoop,
        initialize: (EpollStreamChannel) throws -> Void
    ) -> Result<EpollStreamChannel, any Error> {
        Self.adopt(descriptor, on: loop, watched: nil, initialize: initialize)
    }

    /// `adopt`, for a socket that epoll already watches for a channel's events (`watched`: the registration and
    /// the events it just reported): the channel takes the registration over, with no system call.
    static func adopt(
        _ descriptor: Int32,
        on loop: EpollEventLoop,
        watched: (registration: EpollEventLoop.Registration, events: UInt32)?,
        initialize: (EpollStreamChannel) throws -> Void
    ) -> Result<EpollStreamChannel, any Error> {
        let channel = EpollStreamChannel(descriptor: descriptor, loop: loop)
        do {
            try initialize(channel)
        } catch {
            if let watched { loop.deregister(watched.registration) }
            channel.close0(error: error, mode: .all, promise: nil)
            return .failure(error)
        }
        if let error = channel.activate(takingOver: watched) { return .failure(error) }
        return .success(channel)
    }
}

/// A connect under way: watches its socket for writability (the handshake ended either way) until the timeout.
/// It registers the socket for the events its channel will want, and on success hands that registration over
/// (two `epoll_ctl` calls fewer per connection than leaving epoll and joining it again).
private final class PendingConnect: EpollSelectable, NIOScheduledCallbackHandler {
    typealias Watch = (registration: EpollEventLoop.Registration, events: UInt32)
    private let descriptor: Int32
    private let loop: EpollEventLoop
    private var registration: EpollEventLoop.Registration?
    private var timer: NIOScheduledCallback?
    private var timeout = TimeAmount.zero
    private var finish: ((Result<Watch, any Error>) -> Void)?

    init(descriptor: Int32, loop: EpollEventLoop, finish: @escaping (Result<Watch, any Error>) -> Void) {
        self.descriptor = descriptor
        self.loop = loop
        self.finish = finish
    }

    func start(timeout: TimeAmount) {
        do {
            self.registration = try self.loop.register(
                self,
                descriptor: self.descriptor,
                events: EpollStreamChannel.watchedEvents
            )
        } catch {
            self.end(.failure(error))
            return
        }
        self.timeout = timeout
        self.timer = try? self.loop.assumeIsolated().scheduleCallback(in: timeout, handler: self)
    }

    func handleScheduledCallback(eventLoop: some EventLoop) {
        self.timer = nil
        self.end(.failure(ChannelError.connectTimeout(self.timeout)))
    }

    func ready(_ events: UInt32) {
        var code: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = getsockopt(self.descriptor, SOL_SOCKET, SO_ERROR, &code, &length)
        if code == 0 && events & (CEPOLL_ERR | CEPOLL_HUP) == 0 {
            self.end(.success((self.registration!, events)))
        } else {
            self.end(.failure(IOError(errnoCode: code == 0 ? ECONNREFUSED : code, reason: "connect")))
        }
    }

    func runPass() {}

    func loopClosing() {
        self.end(.failure(EventLoopError.shutdown))
    }

    /// Ends the connect; on success the socket and its registration go to the channel, otherwise both end here.
    private func end(_ outcome: Result<Watch, any Error>) {
        guard let finish = self.finish else { return }
        self.finish = nil
        self.timer?.cancel()
        self.timer = nil
        if case .failure = outcome {
            if let registration = self.registration { self.loop.deregister(registration) }
            Glibc.close(self.descriptor)
        }
        finish(outcome)
    }
}
