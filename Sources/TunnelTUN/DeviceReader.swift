import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Reading a TUN queue outside SwiftNIO's reads, for the readers' read-back (README, full-tunnel data path):
/// right after writing packets to the device, what the host answered inside those writes is read and sent at
/// once; and after NIO's one-packet read while the queue is busy (`delivered(at:)`), the rest of the burst is
/// taken in one batch. The queue's read descriptor belongs to a NIO pipe channel; the reader's handler keeps
/// this state from the channel's events, on the channel's event loop, so a read never uses a closed descriptor.
public struct DeviceReadBack {
    /// Most packets one read-back takes; the rest wait for NIO's next read.
    public static let limit = 32

    private let descriptor: Int32
    private let packetCapacity: Int
    private var allocator = ByteBufferAllocator()
    /// The channel is open, so `descriptor` is still the queue's. NIO closes it and then reports the channel
    /// inactive before any other callback runs.
    private var open = false
    /// A burst of packets is being handed on (by NIO's reads or a read-back): a nested read-back waits.
    public var busy = false
    /// The buffer of the last read that found nothing.
    private var spare: ByteBuffer?
    /// When NIO last delivered a packet of this queue.
    private var lastDelivery: NIODeadline?

    /// Packets NIO delivers closer together than this mean the queue is busy: drain it after each delivery.
    public static let busyGap: TimeAmount = .milliseconds(2)

    public init(descriptor: Int32, packetCapacity: Int) {
        self.descriptor = descriptor
        self.packetCapacity = packetCapacity
    }

    /// From the handler's `handlerAdded`.
    public mutating func attached(to channel: any Channel) {
        self.allocator = channel.allocator
        self.open = channel.isActive
    }

    /// From `channelActive` (true) and `channelInactive` (false).
    public mutating func channel(active: Bool) {
        self.open = active
    }

    /// Whether a read-back may run now (the channel is open and no burst is being handed on).
    public var ready: Bool { self.open && !self.busy }

    /// NIO delivered a packet of this queue at `now` (one per wake-up: a device read never fills NIO's
    /// buffer). Whether to drain the queue after it: yes while packets come close together (a transfer, where
    /// the drain takes the rest of the burst in one batch); no for a packet after a quiet spell (a ping, a
    /// lone reply), where the drain would find nothing and only delay the process the packet just woke.
    public mutating func delivered(at now: NIODeadline) -> Bool {
        defer { self.lastDelivery = now }
        guard let last = self.lastDelivery else { return false }
        return now - last < Self.busyGap
    }

    /// One packet the queue holds now, or nil when it holds none (or the read failed: the channel meets that
    /// error on its own next read). Never waits. Call only when `ready`, and at most `limit` times per
    /// read-back. A read that finds nothing keeps its buffer for the next one: no allocation per empty read.
    public mutating func readPacket() -> ByteBuffer? {
        var packet = self.spare.take() ?? self.allocator.buffer(capacity: self.packetCapacity)
        let count = packet.writeWithUnsafeMutableBytes(minimumWritableBytes: self.packetCapacity) { space in
            while true {
                let count = Glibc.read(self.descriptor, space.baseAddress, space.count)
                if count >= 0 || errno != EINTR { return max(count, 0) }
            }
        }
        guard count > 0 else {
            self.spare = packet
            return nil
        }
        if let small = Self.copyIfSmall(packet, allocator: self.allocator) {
            packet.clear()
            self.spare = packet
            return small
        }
        return packet
    }

    /// A device with offload headers reads into 64 KiB buffers (a segment may be that large): a small packet
    /// is copied out so that a queue of them does not hold 64 KiB each. Nil when `packet` is fine as it is.
    @inlinable
    public static func copyIfSmall(_ packet: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer? {
        guard packet.capacity > 16384, packet.readableBytes <= packet.capacity / 8 else { return nil }
        var copy = allocator.buffer(capacity: packet.readableBytes)
        copy.writeImmutableBuffer(packet)
        return copy
    }
}

/// Where a device reader hands the packets it reads.
public protocol DevicePacketSink: AnyObject {
    /// One packet read from the device.
    func devicePacket(_ packet: ByteBuffer)
    /// A burst of reads is over: send on what it queued.
    func deviceBurstFinished()
}

/// The handler on a device queue's pipe channel: hands each packet NIO reads to its sink, and reads back
/// (`DeviceReadBack`) after NIO's one-packet reads while the queue is busy, and when the sink's owner asks
/// (`readBack`, right after writing packets to the device). Shared by the client's full tunnel and the
/// server's TUN queues.
public final class DeviceReader<Sink: DevicePacketSink>: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer
    public let sink: Sink
    private var state: DeviceReadBack

    public init(sink: Sink, descriptor: Int32, packetCapacity: Int) {
        self.sink = sink
        self.state = DeviceReadBack(descriptor: descriptor, packetCapacity: packetCapacity)
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        self.state.attached(to: context.channel)
    }

    public func channelActive(context: ChannelHandlerContext) {
        self.state.channel(active: true)
        context.fireChannelActive()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        self.state.channel(active: false)
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.state.busy = true
        let packet = self.unwrapInboundIn(data)
        self.sink.devicePacket(DeviceReadBack.copyIfSmall(packet, allocator: context.channel.allocator) ?? packet)
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.state.busy = false
        self.sink.deviceBurstFinished()
        // NIO reads one packet per wake-up (a device read never fills its buffer): once that packet is on its
        // way, take what else a busy queue holds in one batch instead of one wake-up each.
        if self.state.delivered(at: .now()) { self.readBack() }
    }

    /// Reads and hands on the packets the queue holds now, without waiting for readiness. Call on the
    /// channel's event loop.
    ///
    /// With `sendingFirstAtOnce` (after writing one packet) the first packet found goes on before the next
    /// read, which most often finds the queue empty: a ping reply does not wait for that read. After more
    /// writes (a transfer's ACKs) the answers go on as one batch.
    public func readBack(sendingFirstAtOnce: Bool = false) {
        guard self.state.ready else { return }
        self.state.busy = true
        defer { self.state.busy = false }
        var read = 0
        while read < DeviceReadBack.limit, let packet = self.state.readPacket() {
            self.sink.devicePacket(packet)
            read += 1
            if sendingFirstAtOnce && read == 1 { self.sink.deviceBurstFinished() }
        }
        if read > (sendingFirstAtOnce ? 1 : 0) { self.sink.deviceBurstFinished() }
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // EIO: the device went away (deleted by hand). Nothing more can be read.
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension DeviceReader: Sendable {}
