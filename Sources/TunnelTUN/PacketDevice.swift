import NIOCore
import TunnelProtocol

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
    /// Writes one packet on a queue, as the device takes it (with its offload header when
    /// `hasOffloadHeaders`). False when it was dropped (the queue is full) or refused.
    func write(_ packet: ByteBuffer, queue: Int) -> Bool
    /// Whether each packet read or written starts with a `PacketOffloadHeader`.
    var hasOffloadHeaders: Bool { get }
    /// Writes one IP packet that has no offload header (the device's plain header goes first if it needs one).
    func writePlain(_ packet: ByteBuffer, queue: Int) -> Bool
    /// Turns segmentation offload on or off (device-wide); false when the device cannot.
    func setOffload(_ enabled: Bool) -> Bool
    /// Closes the write descriptors. Call only when no thread writes any more.
    func closeWriters()
    /// Closes the read descriptors that were never handed to a channel.
    func closeReaders()
}

extension PacketDevice {
    public func readDescriptor() -> Int32 { self.readDescriptor(queue: 0) }
    public func write(_ packet: ByteBuffer) -> Bool { self.write(packet, queue: 0) }
    public func writePlain(_ packet: ByteBuffer) -> Bool { self.writePlain(packet, queue: 0) }
    public var hasOffloadHeaders: Bool { false }

    /// The read buffer a packet of this device needs: the MTU and some room, or 64 KiB and the offload header
    /// when the device may hand over whole TCP segments.
    public func readCapacity(mtu: Int) -> Int {
        self.hasOffloadHeaders ? PacketOffloadHeader.byteCount + 65536 : mtu + 64
    }
    public func writePlain(_ packet: ByteBuffer, queue: Int) -> Bool { self.write(packet, queue: queue) }
    public func setOffload(_ enabled: Bool) -> Bool { false }
}

extension TUNDevice: PacketDevice {}
