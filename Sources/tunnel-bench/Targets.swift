import Glibc
import Synchronization

/// Content of every bulk transfer: a 1 MiB + 13 byte random block, repeated (the odd period makes a
/// reordered or duplicated chunk visible to the check).
let pattern: [UInt8] = {
    var generator = SystemRandomNumberGenerator()
    return (0..<((1 << 20) + 13)).map { _ in UInt8.random(in: 0...255, using: &generator) }
}()

/// Target servers inside the benchmark: source (sends what is asked), sink (receives and acknowledges),
/// echo. One thread per connection, blocking I/O: simple and far faster than any proxy under test.
final class Targets: Sendable {
    let sourcePort: UInt16
    let sinkPort: UInt16
    let echoPort: UInt16

    init() throws {
        let source = try Sock.listen()
        let sink = try Sock.listen()
        let echo = try Sock.listen()
        self.sourcePort = source.port
        self.sinkPort = sink.port
        self.echoPort = echo.port
        Self.acceptLoop(source.fd, Self.serveSource)
        Self.acceptLoop(sink.fd, Self.serveSink)
        Self.acceptLoop(echo.fd, Self.serveEcho)
    }

    private static func acceptLoop(_ fd: Int32, _ serve: @escaping @Sendable (Int32) -> Void) {
        spawn {
            while true {
                let client = accept(fd, nil, nil)
                if client < 0 {
                    if errno == EINTR || errno == ECONNABORTED || errno == EMFILE { continue }
                    return
                }
                Sock.setNoDelay(client)
                spawn {
                    serve(client)
                    close(client)
                }
            }
        }
    }

    /// Reads a u64 BE byte count, then streams that many pattern bytes (UInt64.max = until the reader leaves).
    private static func serveSource(_ fd: Int32) {
        guard let header = try? Sock.recvExact(fd, 8) else { return }
        let total = header.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        var offset: UInt64 = 0
        pattern.withUnsafeBytes { raw in
            while offset < total {
                let start = Int(offset % UInt64(pattern.count))
                let chunk = min(UInt64(min(256 << 10, pattern.count - start)), total - offset)
                guard (try? Sock.sendAll(fd, raw.baseAddress! + start, Int(chunk))) != nil else { return }
                offset += chunk
            }
        }
        shutdown(fd, Int32(SHUT_WR))
        var byte: UInt8 = 0
        _ = recv(fd, &byte, 1, 0)
    }

    /// Reads a u64 BE byte count, receives that many bytes checking them, then answers 1 (ok) or 0 (corrupt).
    private static func serveSink(_ fd: Int32) {
        guard let header = try? Sock.recvExact(fd, 8) else { return }
        let total = header.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        var buffer = [UInt8](repeating: 0, count: 256 << 10)
        var offset: UInt64 = 0
        var ok = true
        buffer.withUnsafeMutableBytes { out in
            pattern.withUnsafeBytes { expected in
                while offset < total {
                    let n = recv(fd, out.baseAddress!, min(out.count, Int(total - offset)), 0)
                    if n <= 0 {
                        ok = false
                        return
                    }
                    ok = ok && matches(out.baseAddress!, n, expected, offset)
                    offset += UInt64(n)
                }
            }
        }
        _ = try? Sock.sendAll(fd, [ok ? 1 : 0])
    }

    private static func serveEcho(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        buffer.withUnsafeMutableBytes { raw in
            while true {
                let n = recv(fd, raw.baseAddress!, raw.count, 0)
                if n <= 0 { return }
                guard (try? Sock.sendAll(fd, raw.baseAddress!, n)) != nil else { return }
            }
        }
    }
}

/// Whether `count` bytes at `data` equal the pattern from stream offset `offset`.
func matches(_ data: UnsafeRawPointer, _ count: Int, _ expected: UnsafeRawBufferPointer, _ offset: UInt64) -> Bool {
    var done = 0
    while done < count {
        let start = Int((offset + UInt64(done)) % UInt64(expected.count))
        let n = min(count - done, expected.count - start)
        if memcmp(data + done, expected.baseAddress! + start, n) != 0 { return false }
        done += n
    }
    return true
}

/// A UDP echo target that also counts what it receives (for the datagram throughput test).
final class UDPTarget: Sendable {
    final class Counters: Sendable {
        let received = Mutex((datagrams: 0, bytes: 0))
        let echo = Mutex(true)
    }
    let port: UInt16
    let counters = Counters()
    func receivedDatagrams() -> Int { self.counters.received.withLock { $0.datagrams } }
    func setEcho(_ on: Bool) { self.counters.echo.withLock { $0 = on } }

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw Sock.Failure("socket") }
        var size: Int32 = 8 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        var addr = Sock.loopback(port: 0)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else { throw Sock.Failure("bind udp") }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        self.port = UInt16(bigEndian: bound.sin_port)
        let counters = self.counters
        spawn {
            var buffer = [UInt8](repeating: 0, count: 65536)
            var from = sockaddr_storage()
            buffer.withUnsafeMutableBytes { raw in
                while true {
                    var fromLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
                    let n = withUnsafeMutablePointer(to: &from) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            recvfrom(fd, raw.baseAddress!, raw.count, 0, $0, &fromLength)
                        }
                    }
                    if n < 0 { continue }
                    counters.received.withLock {
                        $0.datagrams += 1
                        $0.bytes += n
                    }
                    if counters.echo.withLock({ $0 }) {
                        _ = withUnsafePointer(to: &from) {
                            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                                sendto(fd, raw.baseAddress!, n, 0, $0, fromLength)
                            }
                        }
                    }
                }
            }
        }
    }
}
