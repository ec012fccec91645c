import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// The fields of Linux's `struct tcp_info` (getsockopt `TCP_INFO`, linux/tcp.h) that the tunnel connection
/// reads: read through SwiftNIO's socket option provider, so no descriptor is needed.
struct TCPInfo: Sendable {
    /// The first 232 bytes of the kernel's structure (its size since Linux 5.5; older kernels fill less and
    /// leave the rest zero).
    private var raw:
        (
            UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
            UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
            UInt64, UInt64, UInt64, UInt64
        ) = (
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0
        )

    init() {}

    private func u64(at offset: Int) -> UInt64 {
        withUnsafeBytes(of: self.raw) { $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self) }
    }

    private func u32(at offset: Int) -> UInt32 {
        withUnsafeBytes(of: self.raw) { $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self) }
    }

    /// The congestion control's sending rate, bytes per second (`tcpi_pacing_rate`).
    var pacingRate: UInt64 { self.u64(at: 104) }
    /// Bytes written and not yet sent (`tcpi_notsent_bytes`).
    var notSentBytes: UInt32 { self.u32(at: 144) }
    /// Smoothed round trip, microseconds (`tcpi_rtt`).
    var roundTripMicroseconds: UInt32 { self.u32(at: 68) }

    /// `TCP_INFO` of `channel`'s socket, when it is a TCP socket of this event loop (nil otherwise, or on
    /// failure). Call on the channel's event loop: the option is read at once.
    static func of(_ channel: any Channel) -> TCPInfo? {
        guard let provider = channel as? any SocketOptionProvider else { return nil }
        var info: TCPInfo?
        let future: EventLoopFuture<TCPInfo> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(IPPROTO_TCP),
            name: SocketOptionName(TCP_INFO)
        )
        future.assumeIsolated().whenSuccess { info = $0 }
        return info
    }
}
