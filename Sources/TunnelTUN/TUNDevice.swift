import CTUN
import NIOCore
import TunnelProtocol

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A Linux TUN device (IFF_TUN | IFF_NO_PI): each read returns one IP packet, each write sends one.
///
/// The device exists while a descriptor of it is open; closing them (or the process ending, even by a
/// crash) removes the device and every route through it. A device may have several queues (one per event
/// loop): the kernel hands packets of a flow to the queue that flow's packets were last written on, so
/// replies come back on the thread that sent the request. Reads go through a SwiftNIO pipe channel that
/// owns a queue's read descriptor; writes go straight to `write(2)` on a second descriptor of that queue,
/// one packet per call, because NIO's pipe channel would coalesce buffers into one `writev` (one corrupt
/// packet on a TUN).
public final class TUNDevice: Sendable {
    /// The kernel's name for the device (`tunnel0`, ...).
    public let name: String
    private let readDescriptors: [Int32]
    private let writeDescriptors: [Int32]

    public struct OpenError: Error, CustomStringConvertible {
        public var errno: Int32
        public var requested: String
        public var description: String {
            let reason = String(cString: strerror(self.errno))
            switch self.errno {
            case EPERM, EACCES:
                return "cannot create TUN device \(self.requested): \(reason) (needs root or CAP_NET_ADMIN)"
            case ENOENT, ENODEV, ENXIO:
                return
                    "cannot create TUN device \(self.requested): \(reason) (no /dev/net/tun: load the tun module, or give the container the device)"
            case EBUSY:
                return "cannot create TUN device \(self.requested): it is in use by another process"
            default:
                return "cannot create TUN device \(self.requested): \(reason)"
            }
        }
    }

    /// Whether each read and write starts with a `PacketOffloadHeader` (IFF_VNET_HDR).
    public let hasOffloadHeaders: Bool

    /// Creates a device with `queues` queues; `requested` may be a pattern such as `tunnel%d`. With
    /// `offloadHeaders`, every packet read or written starts with its `PacketOffloadHeader`; the kernel hands
    /// over segments of up to 64 KiB only after `setOffload(true)`.
    public init(requested: String, queues: Int = 1, offloadHeaders: Bool = false) throws(OpenError) {
        precondition(queues >= 1 && queues <= 256)
        let size = Int(ctun_name_size())
        var name = [CChar](repeating: 0, count: size)
        var reads: [Int32] = []
        var writes: [Int32] = []
        func closeAll() {
            for fd in reads + writes { Glibc.close(fd) }
        }
        var actual = requested
        for index in 0..<queues {
            let fd = ctun_open(actual, queues > 1 ? 1 : 0, offloadHeaders ? 1 : 0, &name, size)
            guard fd >= 0 else {
                closeAll()
                throw OpenError(errno: -fd, requested: requested)
            }
            let second = fcntl(fd, F_DUPFD_CLOEXEC, 0)
            guard second >= 0 else {
                let saved = errno
                Glibc.close(fd)
                closeAll()
                throw OpenError(errno: saved, requested: requested)
            }
            reads.append(fd)
            writes.append(second)
            if index == 0 {
                actual = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            }
        }
        self.name = actual
        self.hasOffloadHeaders = offloadHeaders
        self.readDescriptors = reads
        self.writeDescriptors = writes
    }

    /// Number of queues.
    public var queueCount: Int { self.readDescriptors.count }

    /// The read descriptor of a queue, to hand to `NIOPipeBootstrap.takingOwnershipOfDescriptor(input:)`,
    /// which closes it.
    public func readDescriptor(queue: Int) -> Int32 { self.readDescriptors[queue] }

    /// Writes one packet on a queue. False when the kernel would block (its queue is full: the packet is
    /// dropped, as a router would) or refused the packet.
    @inlinable
    public func write(_ packet: ByteBuffer, queue: Int) -> Bool {
        packet.withUnsafeReadableBytes { bytes in
            Self.write(descriptor: self.writeDescriptor(queue: queue), bytes)
        }
    }

    /// Writes an IP packet without an offload header on a queue: on a device with offload headers, behind a
    /// plain one (one `writev`).
    public func writePlain(_ packet: ByteBuffer, queue: Int) -> Bool {
        guard self.hasOffloadHeaders else { return self.write(packet, queue: queue) }
        return packet.withUnsafeReadableBytes { bytes in
            // On the stack: no allocation per packet.
            withUnsafeTemporaryAllocation(of: UInt8.self, capacity: PacketOffloadHeader.byteCount) { header in
                header.initialize(repeating: 0)
                return withUnsafeTemporaryAllocation(of: iovec.self, capacity: 2) { vector in
                    vector[0] = iovec(iov_base: UnsafeMutableRawPointer(header.baseAddress), iov_len: header.count)
                    vector[1] = iovec(
                        iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress),
                        iov_len: bytes.count
                    )
                    let total = header.count + bytes.count
                    while true {
                        let written = Glibc.writev(self.writeDescriptor(queue: queue), vector.baseAddress, 2)
                        if written >= 0 { return written == total }
                        if errno == EINTR { continue }
                        return false
                    }
                }
            }
        }
    }

    /// Lets the kernel hand over TCP segments of up to 64 KiB with checksums to complete (on), or only
    /// finished packets (off). Device-wide. False when the device has no offload headers or the kernel refused.
    public func setOffload(_ enabled: Bool) -> Bool {
        guard self.hasOffloadHeaders, let fd = self.writeDescriptors.first else { return false }
        return ctun_set_offload(fd, enabled ? 1 : 0) == 0
    }

    @usableFromInline
    func writeDescriptor(queue: Int) -> Int32 { self.writeDescriptors[queue] }

    @usableFromInline
    static func write(descriptor: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        while true {
            let written = Glibc.write(descriptor, bytes.baseAddress, bytes.count)
            if written >= 0 { return written == bytes.count }
            if errno == EINTR { continue }
            return false
        }
    }

    /// Closes the write descriptors (the read ones belong to their channels). The device goes away once all
    /// are closed. Call only when no thread writes any more.
    public func closeWriters() {
        for fd in self.writeDescriptors { Glibc.close(fd) }
    }

    /// Closes the read descriptors that were never handed to a channel.
    public func closeReaders() {
        for fd in self.readDescriptors { Glibc.close(fd) }
    }
}
