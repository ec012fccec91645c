import Logging
import NIOCore
import TunnelConfig
import TunnelProtocol
import TunnelTransport

#if canImport(Glibc)
import Glibc
#endif

extension TunnelConnectionHandler.Configuration {
    /// The connection configuration for the given timings.
    package init(_ timings: TunnelTimings) {
        self.init()
        self.session.timers = ConnectionTimers.Configuration(
            handshakeTimeout: .nanoseconds(timings.handshakeTimeout),
            keepaliveInterval: .nanoseconds(timings.keepaliveInterval),
            deadTimeout: .nanoseconds(timings.deadTimeout)
        )
        self.session.multiplexer.initialStreamWindow = timings.streamWindow
        self.session.multiplexer.maxStreamWindow = timings.maxStreamWindow
        self.session.multiplexer.connectionWindow = timings.connectionWindow
        self.session.multiplexer.maxConcurrentStreams = timings.maxStreams
        self.session.rekeyPolicy = RekeyPolicy(maxBytes: UInt64(timings.rekeyBytes))
        self.session.resumption = timings.resumeGrace > 0
    }
}

/// Socket settings of a stream's local socket (the application's connection, or the server's outbound one).
package enum StreamSocket {
    /// Reads start small, so an idle stream's pooled receive buffer stays small (NIO keeps each channel's
    /// last buffer for reuse), and grow to 64 KiB for bulk streams.
    package static let receiveAllocator = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 2048, maximum: 65536)
    /// Up to four 64 KiB reads per readiness event: a bulk stream fills several records per flush, so the
    /// tunnel sees fewer, larger writes (each write wakes the reader at the other end).
    package static let maxMessagesPerRead: UInt = 4

    /// Sets a stream socket's options directly on the channel before it is registered. Options given to a
    /// bootstrap are applied one future at a time, a cost paid on every connection a browser opens.
    package static func configure(_ channel: any Channel) throws {
        guard let options = channel.syncOptions else { throw ChannelError.operationUnsupported }
        try options.setOption(.autoRead, value: false)
        try options.setOption(.allowRemoteHalfClosure, value: true)
        try options.setOption(.maxMessagesPerRead, value: Self.maxMessagesPerRead)
        try options.setOption(.recvAllocator, value: Self.receiveAllocator)
    }
}

/// Socket settings of the tunnel connection itself.
///
/// Queues are kept short so the multiplexer's scheduler, not a FIFO below it, decides what goes next: the
/// kernel holds at most `TCP_NOTSENT_LOWAT` of unsent data, and NIO's buffer turns unwritable at its high
/// watermark, at which point streams keep their data (and stop reading) until the tunnel drains. Without this,
/// a bulk download queues megabytes in front of every interactive frame.
package enum TunnelSocket {
    package static let writeBufferWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 64 << 10, high: 128 << 10)
    package static let receiveAllocator = AdaptiveRecvByteBufferAllocator(
        minimum: 4096,
        initial: 65536,
        maximum: 256 << 10
    )
    /// `TCP_NOTSENT_LOWAT` (Linux option 25).
    package static let notSentLowWater = ChannelOptions.Types.SocketOption(
        level: .init(rawValue: Int32(IPPROTO_TCP)),
        name: .init(rawValue: 25)
    )
    package static let notSentLowWaterBytes = 128 << 10

    /// Applies the tunnel connection's settings to `channel` (in its initializer, on its event loop): the
    /// starting queue limits (the connection then sizes them from its rate: `SendQueueBudget`), one read per
    /// readiness event, and the congestion control.
    /// With resumption on, `TCP_USER_TIMEOUT` bounds how long sent data may stay unacknowledged.
    package static func configure(_ channel: any Channel, timings: TunnelTimings, logger: Logger) throws {
        let options = channel.syncOptions!
        try options.setOption(.writeBufferWaterMark, value: Self.writeBufferWaterMark)
        try options.setOption(Self.notSentLowWater, value: Self.notSentLowWaterBytes)
        try options.setOption(.recvAllocator, value: Self.receiveAllocator)
        try options.setOption(.maxMessagesPerRead, value: 1)
        if timings.resumeGrace > 0 {
            let milliseconds = Int(min(timings.unackedTimeout / 1_000_000, Int64(Int32.max)))
            try options.setOption(Self.userTimeout, value: milliseconds)
        }
        Self.applyCongestionControl(timings.congestionControl, to: channel, logger: logger)
    }

    /// `TCP_USER_TIMEOUT` (Linux option 18): milliseconds sent data may stay unacknowledged.
    package static let userTimeout = ChannelOptions.Types.SocketOption(
        level: .init(rawValue: Int32(IPPROTO_TCP)),
        name: .init(rawValue: 18)
    )

    /// `TCP_CONGESTION` (Linux option 13).
    package static let congestionOption = NIOBSDSocket.Option(rawValue: 13)

    /// An algorithm name as `setsockopt(TCP_CONGESTION)` takes it (NUL-padded, at most 15 characters).
    package struct AlgorithmName: Sendable {
        package var bytes:
            (
                UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                UInt8
            ) =
                (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        package init(_ name: String) {
            withUnsafeMutableBytes(of: &self.bytes) { raw in
                for (i, byte) in name.utf8.prefix(15).enumerated() { raw[i] = byte }
            }
        }
    }

    /// Sets the congestion control of a tunnel connection. `auto` asks for BBR: a tunnel carries other
    /// flows' congestion control inside one TCP connection, and a loss-based outer algorithm (cubic) falls
    /// to a few Mbit/s at 1% random loss, stalling every inner flow with it (TCP-over-TCP); BBR paces to
    /// the measured bottleneck instead. Where BBR is not available (or not allowed for this user) the
    /// system default stays, silently for `auto` and with a warning for an explicit name.
    package static func applyCongestionControl(_ choice: String, to channel: any Channel, logger: Logger) {
        guard choice != "system", let provider = channel as? any SocketOptionProvider else { return }
        let name = choice == "auto" ? "bbr" : choice
        provider.unsafeSetSocketOption(level: .tcp, name: Self.congestionOption, value: AlgorithmName(name)).whenFailure
        { error in
            if choice != "auto" {
                logger.warning(
                    "cannot use congestion control \(name) on the tunnel connection (\(error)); using the system default"
                )
            }
        }
    }
}

/// A start-up failure whose description is the whole story (it names what failed and what to do), so the
/// command line prints it as it is.
public protocol StartupFailure: Error, CustomStringConvertible {}

extension SocketAddress {
    /// As a tunnel address (the bound address in OPEN_RESULT, a datagram's source), IPv4 peers as IPv4.
    package var targetAddress: TargetAddress {
        guard let bytes = self.unmappedBytes, let port = self.port else { return .unspecified }
        if bytes.count == 4 {
            let value = UInt32(bytes[0]) << 24 | UInt32(bytes[1]) << 16 | UInt32(bytes[2]) << 8 | UInt32(bytes[3])
            return TargetAddress(host: .ipv4(value), port: UInt16(port))
        }
        return TargetAddress(host: .ipv6(bytes), port: UInt16(port))
    }
}
