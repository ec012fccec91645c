import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Writes a tunnel connection's records: with send(2) on the socket directly when that is allowed and
/// nothing written earlier is still waiting in the channel (bytes stay in order), else through the channel.
/// A partial send hands the rest to the channel, which then applies its write buffer and writability as
/// usual; an error is left for the channel to meet and report on the same bytes, so every failure still ends
/// the connection one way. Skipping NIO's write path saves a full-tunnel packet several microseconds.
///
/// Used on the connection's event loop only.
final class DirectSocketWriter {
    /// The socket's descriptor, once `enable` found it.
    private var descriptor: Int32?
    /// Writes handed to the channel and not finished yet (counted only while enabled).
    private var pendingChannelWrites = 0
    /// The next write goes through the channel, behind any it still holds from before `enable`.
    private var barrier = false

    var isEnabled: Bool { self.descriptor != nil }
    /// Bytes handed to the socket or the channel so far (records on the wire, with their length prefixes).
    private(set) var bytesWritten = 0

    /// Writes to the channel's socket directly from now on: `known` when given, else the descriptor found
    /// among this process's by the channel's addresses.
    func enable(channel: any Channel, descriptor known: Int32? = nil) -> Bool {
        guard self.descriptor == nil else { return true }
        guard channel.isActive, let local = channel.localAddress, let remote = channel.remoteAddress,
            let descriptor = known ?? SocketDescriptor.find(local: local, remote: remote)
        else { return false }
        self.descriptor = descriptor
        // Writes made before now were not counted: the first write after this goes behind them.
        self.barrier = true
        return true
    }

    /// The socket is closing: never touch the descriptor again (its number may name another file soon).
    func disable() {
        self.descriptor = nil
    }

    /// Writes `buffer`, directly or through `context`.
    func write(_ buffer: ByteBuffer, context: ChannelHandlerContext) {
        self.bytesWritten += buffer.readableBytes
        // Once NIO has closed the socket (it marks the channel inactive before any callback runs), the number
        // may name another file: never use it then.
        guard let descriptor = self.descriptor, context.channel.isActive else {
            context.writeAndFlush(NIOAny(buffer), promise: nil)
            return
        }
        var buffer = buffer
        if self.pendingChannelWrites == 0 && !self.barrier {
            let written = buffer.withUnsafeReadableBytes { bytes in
                while true {
                    let count = Glibc.send(
                        descriptor,
                        bytes.baseAddress,
                        bytes.count,
                        Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)
                    )
                    if count >= 0 || errno != EINTR { return count }
                }
            }
            if written == buffer.readableBytes { return }
            if written > 0 { buffer.moveReaderIndex(forwardBy: written) }
        }
        self.barrier = false
        _ = self.channelWrite(buffer, context: context)
    }

    /// Writes through the channel (counted while enabled, so later direct writes wait for it).
    func writeThroughChannel(_ buffer: ByteBuffer, context: ChannelHandlerContext) -> EventLoopFuture<Void> {
        self.bytesWritten += buffer.readableBytes
        return self.channelWrite(buffer, context: context)
    }

    private func channelWrite(_ buffer: ByteBuffer, context: ChannelHandlerContext) -> EventLoopFuture<Void> {
        let promise = context.eventLoop.makePromise(of: Void.self)
        if self.descriptor != nil {
            self.pendingChannelWrites += 1
            promise.futureResult.assumeIsolated().whenComplete { _ in self.pendingChannelWrites -= 1 }
        }
        context.writeAndFlush(NIOAny(buffer), promise: promise)
        return promise.futureResult
    }
}
