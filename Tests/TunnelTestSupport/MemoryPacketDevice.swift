import NIOCore
import TunnelTUN

#if canImport(Glibc)
import Glibc
#endif

/// A packet device in memory: each queue is a `SOCK_SEQPACKET` socket pair, which keeps packet boundaries as
/// a TUN device does (one read, one packet). The device's side is what the code under test reads and writes;
/// the test plays the host's network stack on the other side with `inject` (a packet an app sent, for the
/// device to read) and `receive` (a packet the code wrote to the device).
public final class MemoryPacketDevice: PacketDevice {
    public let name: String
    private let deviceRead: [Int32]
    private let deviceWrite: [Int32]
    private let hostSide: [Int32]

    public init(name: String = "memtun0", queues: Int = 1) {
        precondition(queues >= 1)
        var reads: [Int32] = []
        var writes: [Int32] = []
        var hosts: [Int32] = []
        for _ in 0..<queues {
            var pair: [Int32] = [0, 0]
            let made = socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair)
            precondition(made == 0, "socketpair: \(String(cString: strerror(errno)))")
            _ = fcntl(pair[0], F_SETFL, fcntl(pair[0], F_GETFL) | O_NONBLOCK)
            _ = fcntl(pair[1], F_SETFL, fcntl(pair[1], F_GETFL) | O_NONBLOCK)
            reads.append(pair[0])
            writes.append(fcntl(pair[0], F_DUPFD_CLOEXEC, 0))
            hosts.append(pair[1])
        }
        self.name = name
        self.deviceRead = reads
        self.deviceWrite = writes
        self.hostSide = hosts
    }

    deinit {
        for fd in self.hostSide { close(fd) }
    }

    public var queueCount: Int { self.deviceRead.count }

    public func readDescriptor(queue: Int) -> Int32 { self.deviceRead[queue] }

    public func write(_ packet: ByteBuffer, queue: Int) -> Bool {
        packet.withUnsafeReadableBytes { bytes in
            Glibc.write(self.deviceWrite[queue], bytes.baseAddress, bytes.count) == bytes.count
        }
    }

    public func closeWriters() {
        for fd in self.deviceWrite { close(fd) }
    }

    public func closeReaders() {
        for fd in self.deviceRead { close(fd) }
    }

    /// The host sends `packet` into the device (an app's packet): the device's reader gets it.
    @discardableResult
    public func inject(_ packet: [UInt8], queue: Int = 0) -> Bool {
        packet.withUnsafeBytes { send(self.hostSide[queue], $0.baseAddress, $0.count, 0) == packet.count }
    }

    /// The next packet written to the device on `queue`, or nil when none is waiting.
    public func receive(queue: Int = 0) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: 65536)
        let count = buffer.withUnsafeMutableBytes { recv(self.hostSide[queue], $0.baseAddress, $0.count, 0) }
        guard count >= 0 else { return nil }
        return Array(buffer.prefix(count))
    }
}
