import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// A TCP connect on a non-blocking socket of our own, for callers that hand the connected descriptor to NIO
/// (`ClientBootstrap.withConnectedSocket`) or race several (`Dialer`).
package enum NonBlockingConnect {
    package enum State: Equatable, Sendable {
        case connected(Int32)
        /// The handshake is under way: the descriptor turns writable when it ends (see `check`).
        case pending(Int32)
        /// The errno that ended it (the descriptor is closed).
        case failed(Int32)
    }

    /// Opens a non-blocking socket and starts connecting it to `address`. A connect to this host usually ends
    /// within the call: the kernel runs the whole handshake before returning, and reports it at once to
    /// `check`. TCP_NODELAY is set, as NIO's bootstrap would.
    package static func start(_ address: SocketAddress) -> State {
        let fd = socket(
            address.protocol.rawValue,
            Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue),
            0
        )
        guard fd >= 0 else { return .failed(errno) }
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        let result = address.withSockAddr { pointer, size in Glibc.connect(fd, pointer, socklen_t(size)) }
        if result == 0 { return .connected(fd) }
        let error = errno
        if error == EINPROGRESS || error == EINTR { return .pending(fd) }
        close(fd)
        return .failed(error)
    }

    /// Where a pending connect stands now, without waiting. A failure closes the descriptor.
    package static func check(_ fd: Int32) -> State {
        var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        guard poll(&entry, 1, 0) > 0 else { return .pending(fd) }
        let error = Self.error(of: fd)
        if error == 0 { return .connected(fd) }
        close(fd)
        return .failed(error)
    }

    /// How the handshake of a descriptor that turned writable ended: 0 when connected, else its errno.
    package static func error(of fd: Int32) -> Int32 {
        var error: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0 { error = errno }
        return error
    }
}
