import NIOCore
import TunnelConfig
import TunnelProtocol
import TunnelTransport

extension TunnelConnectionHandler.Configuration {
    /// The connection configuration for the given timings.
    init(_ timings: TunnelTimings) {
        self.init()
        self.handshakeTimeout = .nanoseconds(timings.handshakeTimeout)
        self.keepaliveInterval = .nanoseconds(timings.keepaliveInterval)
        self.deadTimeout = .nanoseconds(timings.deadTimeout)
        self.multiplexer.initialStreamWindow = timings.streamWindow
        self.multiplexer.maxStreamWindow = timings.maxStreamWindow
        self.multiplexer.connectionWindow = timings.connectionWindow
        self.multiplexer.maxConcurrentStreams = timings.maxStreams
        self.rekeyPolicy = RekeyPolicy(maxBytes: UInt64(timings.rekeyBytes))
    }
}

/// Socket settings of a stream's local socket (the application's connection, or the server's outbound one).
enum StreamSocket {
    /// Reads start small, so an idle stream's pooled receive buffer stays small (NIO keeps each channel's
    /// last buffer for reuse), and grow to 64 KiB for bulk streams.
    static let receiveAllocator = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 2048, maximum: 65536)
}

/// Socket settings of the tunnel connection itself.
enum TunnelSocket {
    static let writeBufferWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 256 << 10, high: 1 << 20)
    static let receiveAllocator = AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 256 << 10)
}
