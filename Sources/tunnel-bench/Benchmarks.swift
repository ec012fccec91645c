import Glibc
import Synchronization

/// One benchmark run against one proxy (or none: `--direct` connects to the targets straight).
final class Bench: Sendable {
    let proxyPort: UInt16?
    let targets: Targets

    init(proxyPort: UInt16?, targets: Targets) {
        self.proxyPort = proxyPort
        self.targets = targets
    }

    func open(_ targetPort: UInt16) throws -> Int32 {
        if let proxyPort { return try Sock.socks5Connect(proxyPort: proxyPort, targetPort: targetPort) }
        return try Sock.connect(port: targetPort)
    }

    static func header(_ count: UInt64) -> [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: count >> (56 - 8 * UInt64($0))) }
    }

    // MARK: - Bulk

    /// Downloads `bytes` from the source, checking every byte. Returns seconds.
    func download(_ bytes: UInt64) throws -> Double {
        let fd = try self.open(self.targets.sourcePort)
        defer { close(fd) }
        return try Self.receiveChecked(fd, bytes)
    }

    /// Asks the source on `fd` for `bytes` and receives them, checking each against the pattern. Returns seconds.
    static func receiveChecked(_ fd: Int32, _ bytes: UInt64) throws -> Double {
        let start = monotonicNanos()
        try Sock.sendAll(fd, Self.header(bytes))
        var buffer = [UInt8](repeating: 0, count: 256 << 10)
        var offset: UInt64 = 0
        try buffer.withUnsafeMutableBytes { out in
            try pattern.withUnsafeBytes { expected in
                while true {
                    let n = recv(fd, out.baseAddress!, out.count, 0)
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw Sock.Failure("recv")
                    }
                    if n == 0 { break }
                    guard matches(out.baseAddress!, n, expected, offset) else {
                        throw Sock.Failure(message: "corrupt data at offset \(offset)")
                    }
                    offset += UInt64(n)
                }
            }
        }
        guard offset == bytes else { throw Sock.Failure(message: "download ended after \(offset) of \(bytes) bytes") }
        return Double(monotonicNanos() - start) / 1e9
    }

    /// Uploads `bytes` to the sink, which checks them and acknowledges. Returns seconds (to the acknowledgement).
    func upload(_ bytes: UInt64) throws -> Double {
        let fd = try self.open(self.targets.sinkPort)
        defer { close(fd) }
        let start = monotonicNanos()
        try Sock.sendAll(fd, Self.header(bytes))
        var offset: UInt64 = 0
        try pattern.withUnsafeBytes { raw in
            while offset < bytes {
                let start = Int(offset % UInt64(pattern.count))
                let n = min(UInt64(min(256 << 10, pattern.count - start)), bytes - offset)
                try Sock.sendAll(fd, raw.baseAddress! + start, Int(n))
                offset += n
            }
        }
        guard let ack = try Sock.recvExact(fd, 1), ack == [1] else {
            throw Sock.Failure(message: "sink reported corrupt data")
        }
        return Double(monotonicNanos() - start) / 1e9
    }

    /// `streams` downloads of `bytes` each, all at once. Returns (aggregate seconds, per-stream seconds).
    func parallelDownloads(streams: Int, bytes: UInt64) throws -> (Double, [Double]) {
        let results = Mutex<[Result<Double, Sock.Failure>]>([])
        let done = Mutex(0)
        let start = monotonicNanos()
        for _ in 0..<streams {
            spawn {
                let result: Result<Double, Sock.Failure>
                do {
                    result = .success(try self.download(bytes))
                } catch let error as Sock.Failure {
                    result = .failure(error)
                } catch {
                    result = .failure(Sock.Failure(message: "\(error)"))
                }
                results.withLock { $0.append(result) }
                done.withLock { $0 += 1 }
            }
        }
        while done.withLock({ $0 }) < streams { usleep(2000) }
        let total = Double(monotonicNanos() - start) / 1e9
        var each: [Double] = []
        for result in results.withLock({ $0 }) { each.append(try result.get()) }
        return (total, each)
    }

    // MARK: - Request/response

    /// `count` round trips of `size` bytes on one stream. Returns latencies in microseconds, sorted.
    func requestResponse(count: Int, size: Int) throws -> [Double] {
        let fd = try self.open(self.targets.echoPort)
        defer { close(fd) }
        var message = [UInt8](repeating: 0x5A, count: size)
        var reply = [UInt8](repeating: 0, count: size)
        var latencies: [Double] = []
        latencies.reserveCapacity(count)
        for i in 0..<(count + 100) {
            message[0] = UInt8(truncatingIfNeeded: i)
            let t0 = monotonicNanos()
            try Sock.sendAll(fd, message)
            guard try reply.withUnsafeMutableBytes({ try Sock.recvExact(fd, $0.baseAddress!, size) }), reply == message
            else {
                throw Sock.Failure(message: "echo mismatch")
            }
            if i >= 100 { latencies.append(Double(monotonicNanos() - t0) / 1000) }  // the first 100 warm up
        }
        return latencies.sorted()
    }

    /// Starts an endless download on its own stream; returns a function that stops it and reports MiB/s.
    func backgroundBulk() throws -> () -> Double {
        let fd = try self.open(self.targets.sourcePort)
        try Sock.sendAll(fd, Self.header(UInt64.max))
        let received = Mutex<UInt64>(0)
        let stop = Mutex(false)
        let finished = Mutex(false)
        let start = monotonicNanos()
        spawn {
            var buffer = [UInt8](repeating: 0, count: 256 << 10)
            buffer.withUnsafeMutableBytes { out in
                while !stop.withLock({ $0 }) {
                    let n = recv(fd, out.baseAddress!, out.count, 0)
                    if n <= 0 { break }
                    received.withLock { $0 += UInt64(n) }
                }
            }
            finished.withLock { $0 = true }
        }
        return {
            let seconds = Double(monotonicNanos() - start) / 1e9
            stop.withLock { $0 = true }
            shutdown(fd, Int32(SHUT_RDWR))
            while !finished.withLock({ $0 }) { usleep(1000) }
            close(fd)
            return Double(received.withLock { $0 }) / seconds / 1_048_576
        }
    }

    // MARK: - Connections

    /// `threads` loops of connect + SOCKS + 32-byte echo + close for `seconds`. Returns (connections, errors).
    func connectLoop(threads: Int, seconds: Double) -> (Int, Int) {
        let counts = Mutex((ok: 0, errors: 0, finished: 0))
        let deadline = monotonicNanos() + UInt64(seconds * 1e9)
        for _ in 0..<threads {
            spawn {
                var ok = 0
                var errors = 0
                let message = [UInt8](repeating: 0x42, count: 32)
                while monotonicNanos() < deadline && errors < 1000 {
                    do {
                        let fd = try self.open(self.targets.echoPort)
                        try Sock.sendAll(fd, message)
                        let reply = try Sock.recvExact(fd, 32)
                        close(fd)
                        if reply == message { ok += 1 } else { errors += 1 }
                    } catch {
                        errors += 1
                    }
                }
                counts.withLock {
                    $0.ok += ok
                    $0.errors += errors
                    $0.finished += 1
                }
            }
        }
        while counts.withLock({ $0.finished }) < threads { usleep(5000) }
        return counts.withLock { ($0.ok, $0.errors) }
    }

    /// Opens `count` streams (each checked with a 1-byte echo). Returns the open sockets and the seconds it took.
    func openIdle(count: Int) throws -> ([Int32], Double) {
        var fds: [Int32] = []
        fds.reserveCapacity(count)
        let start = monotonicNanos()
        do {
            for _ in 0..<count {
                let fd = try self.open(self.targets.echoPort)
                fds.append(fd)
                try Sock.sendAll(fd, [0x01])
                guard try Sock.recvExact(fd, 1) == [0x01] else { throw Sock.Failure(message: "idle echo failed") }
            }
        } catch {
            for fd in fds { close(fd) }
            throw error
        }
        return (fds, Double(monotonicNanos() - start) / 1e9)
    }

    /// Checks every idle stream with another echo; returns how many answered.
    func checkIdle(_ fds: [Int32]) -> Int {
        var alive = 0
        for fd in fds {
            if (try? Sock.sendAll(fd, [0x02])) != nil, (try? Sock.recvExact(fd, 1)) == [0x02] { alive += 1 }
        }
        return alive
    }
}

func percentile(_ sorted: [Double], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let index = min(sorted.count - 1, max(0, Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1))
    return sorted[index]
}

extension Bench {
    /// Downloads `bytes` through an HTTP CONNECT tunnel on the same port. Returns seconds.
    func downloadViaHTTPConnect(_ bytes: UInt64) throws -> Double {
        guard let proxyPort = self.proxyPort else { return try self.download(bytes) }
        let fd = try Sock.httpConnect(proxyPort: proxyPort, targetPort: self.targets.sourcePort)
        defer { close(fd) }
        return try Self.receiveChecked(fd, bytes)
    }

    /// The SOCKS5 UDP header for a datagram to the UDP target.
    static func udpHeader(_ port: UInt16) -> [UInt8] {
        [0, 0, 0, 0x01, 127, 0, 0, 1, UInt8(port >> 8), UInt8(port & 0xFF)]
    }

    /// Where datagrams for the UDP target go: through a SOCKS5 UDP association when measuring a proxy (its
    /// control connection, to close when done, the relay's port, and the header each datagram needs), else
    /// straight to the target (control -1, no header).
    func udpRoute(to udp: UDPTarget) throws -> (control: Int32, relayPort: UInt16, header: [UInt8]) {
        guard let proxyPort = self.proxyPort else { return (-1, udp.port, []) }
        let (control, relayPort) = try Sock.socks5Associate(proxyPort: proxyPort)
        return (control, relayPort, Self.udpHeader(udp.port))
    }

    /// `count` UDP round trips of `size` bytes through the relay. Returns (sorted latencies in µs, lost).
    func udpRequestResponse(udp: UDPTarget, count: Int, size: Int) throws -> ([Double], Int) {
        let (control, relayPort, header) = try self.udpRoute(to: udp)
        defer { if control >= 0 { close(control) } }
        let fd = try Sock.udpSocket(timeoutMilliseconds: 500)
        defer { close(fd) }
        udp.setEcho(true)
        var latencies: [Double] = []
        var lost = 0
        var reply = [UInt8](repeating: 0, count: 65536)
        for i in 0..<(count + 50) {
            var message = header + [UInt8](repeating: 0x33, count: size)
            message[header.count] = UInt8(truncatingIfNeeded: i)
            let t0 = monotonicNanos()
            guard Sock.sendDatagram(fd, message, to: relayPort) else { throw Sock.Failure("sendto") }
            let n = reply.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n <= 0 {
                lost += 1
                if i == lost - 1 && i == 9 {
                    throw Sock.Failure(message: "no UDP answer in 10 tries (does the proxy allow 127.0.0.1?)")
                }
                continue
            }
            if i >= 50 { latencies.append(Double(monotonicNanos() - t0) / 1000) }
        }
        return (latencies.sorted(), lost)
    }

    /// Sends `datagrams` of `size` bytes, paced in bursts, one way to the UDP target. Returns (seconds, delivered).
    func udpThroughput(udp: UDPTarget, datagrams: Int, size: Int) throws -> (Double, Int) {
        let (control, relayPort, header) = try self.udpRoute(to: udp)
        defer { if control >= 0 { close(control) } }
        let fd = try Sock.udpSocket()
        defer { close(fd) }
        udp.setEcho(false)
        defer { udp.setEcho(true) }
        let before = udp.receivedDatagrams()
        let message = header + [UInt8](repeating: 0x44, count: size)
        let start = monotonicNanos()
        for i in 0..<datagrams {
            _ = Sock.sendDatagram(fd, message, to: relayPort)
            if i % 64 == 63 { usleep(50) }  // bursts, as a real sender would, not a busy loop
        }
        usleep(300_000)  // let the last ones arrive
        let seconds = Double(monotonicNanos() - start) / 1e9 - 0.3
        let delivered = udp.receivedDatagrams() - before
        return (seconds, delivered)
    }

    /// Starts an unpaced flood of `size`-byte datagrams through the relay to the UDP target (echo off: one way,
    /// as a game, a VoIP burst or a QUIC download would send). Returns a function that stops it and reports
    /// (datagrams sent, datagrams delivered).
    func udpFlood(udp: UDPTarget, size: Int) throws -> () -> (Int, Int) {
        let (control, relayPort, header) = try self.udpRoute(to: udp)
        let fd = try Sock.udpSocket()
        udp.setEcho(false)
        let before = udp.receivedDatagrams()
        let stop = Mutex(false)
        let sent = Mutex(0)
        let finished = Mutex(false)
        let message = header + [UInt8](repeating: 0x55, count: size)
        spawn {
            var count = 0
            while !stop.withLock({ $0 }) {
                for _ in 0..<64 where Sock.sendDatagram(fd, message, to: relayPort) { count += 1 }
            }
            sent.withLock { $0 = count }
            finished.withLock { $0 = true }
        }
        return {
            stop.withLock { $0 = true }
            while !finished.withLock({ $0 }) { usleep(1000) }
            usleep(300_000)  // let the last ones arrive
            close(fd)
            if control >= 0 { close(control) }
            udp.setEcho(true)
            return (sent.withLock { $0 }, udp.receivedDatagrams() - before)
        }
    }
}
