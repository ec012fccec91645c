#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CTUN
import NIOCore

/// A Linux TUN device (IFF_TUN | IFF_NO_PI): each read returns one IP packet, each write sends one.
///
/// The device exists while its descriptor is open; closing it (or the process ending, even by a crash)
/// removes the device and every route through it. Reads go through a SwiftNIO pipe channel that owns
/// `takeReadDescriptor()`; writes go straight to `write(2)` on a second descriptor, one packet per call,
/// because NIO's pipe channel would coalesce buffers into one `writev` (one corrupt packet on a TUN).
public final class TUNDevice: Sendable {
    /// The kernel's name for the device (`tunnel0`, ...).
    public let name: String
    /// Descriptor for writes; owned here, closed by `close()`.
    private let writeDescriptor: Int32
    private let readDescriptor: Int32

    public struct OpenError: Error, CustomStringConvertible {
        public var errno: Int32
        public var requested: String
        public var description: String {
            let reason = String(cString: strerror(self.errno))
            switch self.errno {
            case EPERM, EACCES:
                return "cannot create TUN device \(self.requested): \(reason) (needs root or CAP_NET_ADMIN)"
            case ENOENT, ENODEV, ENXIO:
                return "cannot create TUN device \(self.requested): \(reason) (no /dev/net/tun: load the tun module, or give the container the device)"
            case EBUSY:
                return "cannot create TUN device \(self.requested): it is in use by another process"
            default:
                return "cannot create TUN device \(self.requested): \(reason)"
            }
        }
    }

    /// Creates a device; `requested` may be a pattern such as `tunnel%d`.
    public init(requested: String) throws(OpenError) {
        let size = Int(ctun_name_size())
        var name = [CChar](repeating: 0, count: size)
        let fd = ctun_open(requested, &name, size)
        guard fd >= 0 else { throw OpenError(errno: -fd, requested: requested) }
        let second = dup(fd)
        guard second >= 0 else {
            let saved = errno
            Glibc.close(fd)
            throw OpenError(errno: saved, requested: requested)
        }
        _ = fcntl(second, F_SETFD, FD_CLOEXEC)
        self.readDescriptor = fd
        self.writeDescriptor = second
        self.name = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The descriptor to hand to `NIOPipeBootstrap.takingOwnershipOfDescriptor(input:)`, which closes it.
    public var readDescriptorForChannel: Int32 { self.readDescriptor }

    /// Writes one packet. False when the kernel would block (its queue is full: the packet is dropped, as a
    /// router would) or refused the packet.
    @inlinable
    public func write(_ packet: ByteBuffer) -> Bool {
        packet.withUnsafeReadableBytes { bytes in
            Self.write(descriptor: self.descriptorForWrites, bytes)
        }
    }

    @usableFromInline
    var descriptorForWrites: Int32 { self.writeDescriptor }

    @usableFromInline
    static func write(descriptor: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        while true {
            let written = Glibc.write(descriptor, bytes.baseAddress, bytes.count)
            if written >= 0 { return written == bytes.count }
            if errno == EINTR { continue }
            return false
        }
    }

    /// Closes the write descriptor (the read one belongs to the channel). The device goes away once both
    /// are closed.
    public func closeWriter() {
        Glibc.close(self.writeDescriptor)
    }
}
