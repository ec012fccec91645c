import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// A device that carries whole IP packets, one per read and one per write, in one or more queues: the TUN
/// device (`TUNDevice`), or the tests' `MemoryPacketDevice` in TunnelTestSupport (as wireguard-go's
/// `tun.Device` and its `tuntest`). A queue's read descriptor goes to a SwiftNIO pipe channel (which then owns it); writes go straight to the
/// device, one packet per call.
public protocol PacketDevice: AnyObject, Sendable {
    /// The device's name (`tunnel0`).
    var name: String { get }
    /// Number of queues.
    var queueCount: Int { get }
    /// The read descriptor of a queue, to hand to `NIOPipeBootstrap.takingOwnershipOfDescriptor(input:)`.
    func readDescriptor(queue: Int) -> Int32
    /// Writes one packet on a queue. False when it was dropped (the queue is full) or refused.
    func write(_ packet: ByteBuffer, queue: Int) -> Bool
    /// Closes the write descriptors. Call only when no thread writes any more.
    func closeWriters()
    /// Closes the read descriptors that were never handed to a channel.
    func closeReaders()
}

extension PacketDevice {
    public func readDescriptor() -> Int32 { self.readDescriptor(queue: 0) }
    public func write(_ packet: ByteBuffer) -> Bool { self.write(packet, queue: 0) }
}

extension TUNDevice: PacketDevice {}
