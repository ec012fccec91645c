import NIOCore
import NIOPosix
import TunnelConfig
import TunnelEventLoop
import TunnelProtocol
import TunnelRuntime
import TunnelTransport

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The server's outbound side: resolves a stream's destination, applies the deny list to every resolved
/// address, and connects to each address in turn until one answers, within one overall timeout. Failures map
/// to the SOCKS5 reply that says what happened.
///
/// No `bind()` before `connect()`: the kernel picks the source port at connect time, so TIME_WAIT ports
/// are reusable and high connect rates do not exhaust the ephemeral range.
final class OutboundConnector: Sendable {
    let connectTimeout: TimeAmount
    let policy: DestinationPolicy
    let hostAddresses: HostAddresses
    let resolverPool: NIOThreadPool

    init(
        connectTimeout: TimeAmount,
        policy: DestinationPolicy,
        hostAddresses: HostAddresses,
        resolverPool: NIOThreadPool
    ) {
        self.connectTimeout = connectTimeout
        self.policy = policy
        self.hostAddresses = hostAddresses
        self.resolverPool = resolverPool
    }

    /// The outcome of one connect.
    enum Outcome: Sendable {
        /// Connected; `resolved` holds the addresses a name resolved to on the way, for the session's cache.
        case connected(any Channel, resolved: [SocketAddress]?)
        case failed(ReplyCode, String)
    }

    /// Connects to `target` from `eventLoop` (the tunnel's loop, so the socket shares it). `known`: the
    /// addresses its name resolved to a moment ago, if the session remembers them (no resolution then).
    /// `done` runs on `eventLoop`, once. Callbacks rather than futures: this runs for every stream, and an
    /// address literal or a remembered name needs no future at all before the connect.
    func connect(
        to target: TargetAddress,
        known: [SocketAddress]? = nil,
        on eventLoop: any EventLoop,
        done: @escaping (Outcome) -> Void
    ) {
        eventLoop.preconditionInEventLoop()
        let deadline = NIODeadline.now() + self.connectTimeout
        if let known {
            return self.connect(target, addresses: known, fresh: false, deadline: deadline, on: eventLoop, done: done)
        }
        switch Self.literal(target) {
        case .some(.success(let addresses)):
            self.connect(target, addresses: addresses, fresh: false, deadline: deadline, on: eventLoop, done: done)
        case .some(.failure(let reply, let why)):
            done(.failed(reply, why))
        case .none:
            self.resolve(target, on: eventLoop).assumeIsolated().whenSuccess { resolution in
                switch resolution {
                case .success(let addresses):
                    self.connect(
                        target,
                        addresses: addresses,
                        fresh: true,
                        deadline: deadline,
                        on: eventLoop,
                        done: done
                    )
                case .failure(let reply, let why):
                    done(.failed(reply, why))
                }
            }
        }
    }

    /// Applies the policy to the addresses `target` resolved to, then tries the allowed ones in order.
    private func connect(
        _ target: TargetAddress,
        addresses: [SocketAddress],
        fresh: Bool,
        deadline: NIODeadline,
        on eventLoop: any EventLoop,
        done: @escaping (Outcome) -> Void
    ) {
        let host = self.hostAddresses.current()
        let allowed = addresses.filter { self.refusal(for: $0, hostAddresses: host) == nil }
        guard !allowed.isEmpty else {
            let why =
                addresses.first.flatMap { self.refusal(for: $0, hostAddresses: host) }.map { "\($0)" } ?? "no address"
            return done(.failed(.notAllowed, "destination denied by policy (\(why))"))
        }
        self.attempt(allowed[...], host: host, deadline: deadline, on: eventLoop, worst: nil) { outcome in
            guard fresh, case .connected(let channel, _) = outcome else { return done(outcome) }
            done(.connected(channel, resolved: addresses))
        }
    }

    private enum Resolution: Sendable {
        case success([SocketAddress])
        case failure(ReplyCode, String)
    }

    /// An address literal's socket address (nil for a name, which needs resolving).
    private static func literal(_ target: TargetAddress) -> Resolution? {
        switch target.host {
        case .ipv4(let a):
            var packed = ByteBuffer()
            packed.writeInteger(a)
            let address = try? SocketAddress(packedIPAddress: packed, port: Int(target.port))
            return address.map { .success([$0]) } ?? .failure(.addressTypeNotSupported, "bad IPv4")
        case .ipv6(let bytes):
            let address = try? SocketAddress(packedIPAddress: ByteBuffer(bytes: bytes), port: Int(target.port))
            return address.map { .success([$0]) } ?? .failure(.addressTypeNotSupported, "bad IPv6")
        case .domain:
            return nil
        }
    }

    private func resolve(_ target: TargetAddress, on eventLoop: any EventLoop) -> EventLoopFuture<Resolution> {
        guard case .domain(let name) = target.host else {
            return eventLoop.makeSucceededFuture(
                Self.literal(target) ?? .failure(.addressTypeNotSupported, "unknown address type")
            )
        }
        let port = target.port
        return self.resolverPool.runIfActive(eventLoop: eventLoop) { () -> Resolution in
            Self.getaddrinfo(name, port: port)
        }.flatMapErrorThrowing { _ in .failure(.generalFailure, "resolver unavailable") }
    }

    /// Blocking name resolution (runs on the resolver thread pool).
    private static func getaddrinfo(_ name: String, port: UInt16) -> Resolution {
        switch NameResolution.addresses(of: name, port: port) {
        case .success(let addresses): return .success(addresses)
        case .failure(let failure): return .failure(.hostUnreachable, "cannot resolve \(name): \(failure.reason)")
        }
    }

    /// The event loop a tunnel connection runs on (UDP sockets of its associations share it).
    /// Resolves a name for UDP, keeping only the addresses the deny list allows (empty when none).
    func resolveAllowed(_ target: TargetAddress, on eventLoop: any EventLoop) -> EventLoopFuture<[SocketAddress]> {
        self.resolve(target, on: eventLoop).map { resolution in
            guard case .success(let addresses) = resolution else { return [] }
            let host = self.hostAddresses.current()
            return addresses.filter { self.refusal(for: $0, hostAddresses: host) == nil }
        }
    }

    /// Whether the policy refuses `address` (see `DestinationPolicy`).
    func isDenied(_ address: SocketAddress) -> Bool {
        self.refusal(for: address, hostAddresses: self.hostAddresses.current()) != nil
    }

    private func refusal(for address: SocketAddress, hostAddresses: Set<[UInt8]>) -> DestinationPolicy.Refusal? {
        guard let bytes = address.packedBytes else { return .unspecified }
        return self.policy.refusal(for: bytes, hostAddresses: hostAddresses)
    }

    /// Tries each address in order until one connects or the deadline passes; reports the most telling failure.
    private func attempt(
        _ addresses: ArraySlice<SocketAddress>,
        host: Set<[UInt8]>,
        deadline: NIODeadline,
        on eventLoop: any EventLoop,
        worst: (ReplyCode, String)?,
        done: @escaping (Outcome) -> Void
    ) {
        let remaining = deadline - .now()
        guard let address = addresses.first, remaining > .zero else {
            let (reply, why) = worst ?? (.ttlExpired, "connect timed out")
            return done(.failed(reply, why))
        }
        let ended = { (result: Result<any Channel, any Error>) in
            switch result {
            case .success(let channel):
                done(.connected(channel, resolved: nil))
            case .failure(let error as IOError) where error.errnoCode == ECANCELED:
                // The event loop is stopping (`awaitConnect`): no next address on it.
                done(.failed(.generalFailure, "connect given up: server stopping"))
            case .failure(EventLoopError.shutdown):
                // The same on our own loop.
                done(.failed(.generalFailure, "connect given up: server stopping"))
            case .failure(let error):
                let best = Self.moreTelling(Self.reply(for: error), than: worst)
                self.attempt(
                    addresses.dropFirst(),
                    host: host,
                    deadline: deadline,
                    on: eventLoop,
                    worst: best,
                    done: done
                )
            }
        }
        // On our own loop: one connect(2), adopted at once when it ends there (every local target), otherwise
        // watched for writability until the deadline.
        if let loop = eventLoop as? EpollEventLoop {
            EpollStreamChannel.connect(
                to: address,
                timeout: remaining,
                on: loop,
                initialize: { try StreamSocket.configure($0) },
                done: { result in ended(result.map { $0 }) }
            )
            return
        }
        // One of this host's addresses (loopback, or an interface's): see `connectHere`.
        if address.unmappedBytes.map({ IPAddress.isLoopback($0) || host.contains($0) }) ?? false {
            self.connectHere(address, deadline: deadline, on: eventLoop, done: ended)
        } else {
            ClientBootstrap(group: eventLoop)
                .connectTimeout(remaining)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try StreamSocket.configure(channel) }
                }
                .connect(to: address)
                .assumeIsolated().whenComplete(ended)
        }
    }

    /// Connects to an address of this host with a socket of our own. The kernel runs such a handshake within
    /// connect(2), so the socket is connected (or refused) when the call returns, and NIO takes it over as it
    /// is: no write-readiness round through the event loop, and none of the bootstrap's per-connect futures,
    /// about an eighth of the server's CPU per stream to a local service. A handshake that did not end at once
    /// (the listener's queue was full, so its SYN waits for the kernel's retry) is looked at again on a
    /// backing-off timer until the deadline.
    private func connectHere(
        _ address: SocketAddress,
        deadline: NIODeadline,
        on eventLoop: any EventLoop,
        done: @escaping (Result<any Channel, any Error>) -> Void
    ) {
        let adopt = { (descriptor: Int32) in
            ClientBootstrap(group: eventLoop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try StreamSocket.configure(channel) }
                }
                .withConnectedSocket(descriptor)
                .assumeIsolated().whenComplete(done)
        }
        var state = NonBlockingConnect.start(address)
        if case .pending(let descriptor) = state { state = NonBlockingConnect.check(descriptor) }
        switch state {
        case .connected(let descriptor):
            adopt(descriptor)
        case .failed(let error):
            done(.failure(IOError(errnoCode: error, reason: "connect")))
        case .pending(let descriptor):
            Self.awaitConnect(descriptor, deadline: deadline, after: .microseconds(50), on: eventLoop) { state in
                switch state {
                case .connected(let descriptor): adopt(descriptor)
                case .failed(let error): done(.failure(IOError(errnoCode: error, reason: "connect")))
                case .pending(let descriptor):
                    close(descriptor)
                    done(.failure(ChannelError.connectTimeout(.zero)))
                }
            }
        }
    }

    /// Looks at a pending connect after `delay`, then twice as long each time up to 64 ms, until it ends or
    /// `deadline` passes (`pending` then). When the event loop stops first (its timers are cancelled), the
    /// socket is closed and the connect ends as `failed(ECANCELED)`.
    private static func awaitConnect(
        _ descriptor: Int32,
        deadline: NIODeadline,
        after delay: TimeAmount,
        on eventLoop: any EventLoop,
        done: @escaping (NonBlockingConnect.State) -> Void
    ) {
        let wake = min(deadline, .now() + delay)
        let task = eventLoop.assumeIsolated().scheduleTask(deadline: wake) {
            let state = NonBlockingConnect.check(descriptor)
            guard case .pending = state, NIODeadline.now() < deadline else { return done(state) }
            Self.awaitConnect(
                descriptor,
                deadline: deadline,
                after: min(delay * 2, .milliseconds(64)),
                on: eventLoop,
                done: done
            )
        }
        task.futureResult.assumeIsolated().whenFailure { _ in
            close(descriptor)
            done(.failed(ECANCELED))
        }
    }

    /// RFC 1928 §6 reply for a connect error.
    static func reply(for error: any Error) -> (ReplyCode, String) {
        if let channelError = error as? ChannelError, case .connectTimeout = channelError {
            return (.ttlExpired, "connect timed out")
        }
        if let ioError = error as? IOError {
            switch ioError.errnoCode {
            case ECONNREFUSED: return (.connectionRefused, "connection refused")
            case ENETUNREACH: return (.networkUnreachable, "network unreachable")
            case EHOSTUNREACH, EHOSTDOWN: return (.hostUnreachable, "host unreachable")
            case ETIMEDOUT: return (.ttlExpired, "connect timed out")
            case EACCES, EPERM: return (.notAllowed, "connect not permitted")
            case EADDRNOTAVAIL, EAFNOSUPPORT: return (.networkUnreachable, "address not available")
            default: return (.generalFailure, "connect failed: \(ioError)")
            }
        }
        return (.generalFailure, "connect failed: \(error)")
    }

    /// Which failure to report when several addresses failed differently: the one closest to the target.
    private static func moreTelling(_ a: (ReplyCode, String), than b: (ReplyCode, String)?) -> (ReplyCode, String) {
        guard let b else { return a }
        func rank(_ r: ReplyCode) -> Int {
            switch r {
            case .connectionRefused: 5
            case .ttlExpired: 4
            case .hostUnreachable: 3
            case .networkUnreachable: 2
            case .notAllowed: 1
            default: 0
            }
        }
        return rank(a.0) >= rank(b.0) ? a : b
    }
}
