import Glibc

/// Minimal blocking socket helpers (the benchmark measures the proxy, so it stays out of the way).
enum Sock {
    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ what: String) { self.description = "\(what): \(String(cString: strerror(errno)))" }
        init(message: String) { self.description = message }
    }

    /// 127.0.0.1:`port`.
    static func loopback(port: UInt16) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        return addr
    }

    static func listen(port: UInt16 = 0) throws -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure("socket") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: port)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0, Glibc.listen(fd, 4096) == 0 else { throw Failure("bind/listen") }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return (fd, UInt16(bigEndian: bound.sin_port))
    }

    static func connect(port: UInt16, timeoutSeconds: Int = 15) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure("socket") }
        var addr = Self.loopback(port: port)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else {
            close(fd)
            throw Failure("connect to 127.0.0.1:\(port)")
        }
        setNoDelay(fd)
        setTimeout(fd, seconds: timeoutSeconds)
        return fd
    }

    static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    static func setTimeout(_ fd: Int32, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    static func sendAll(_ fd: Int32, _ pointer: UnsafeRawPointer, _ count: Int) throws {
        var sent = 0
        while sent < count {
            let n = send(fd, pointer + sent, count - sent, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                throw Failure("send")
            }
            sent += n
        }
    }

    static func sendAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try sendAll(fd, $0.baseAddress!, $0.count) }
    }

    /// Reads exactly `count` bytes into `pointer`; false on EOF.
    static func recvExact(_ fd: Int32, _ pointer: UnsafeMutableRawPointer, _ count: Int) throws -> Bool {
        var got = 0
        while got < count {
            let n = recv(fd, pointer + got, count - got, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw Failure("recv")
            }
            if n == 0 { return false }
            got += n
        }
        return true
    }

    static func recvExact(_ fd: Int32, _ count: Int) throws -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        let ok = try out.withUnsafeMutableBytes { try recvExact(fd, $0.baseAddress!, count) }
        return ok ? out : nil
    }

    /// SOCKS5 CONNECT to 127.0.0.1:port through the proxy (RFC 1928, no authentication).
    static func socks5Connect(proxyPort: UInt16, targetPort: UInt16) throws -> Int32 {
        let fd = try connect(port: proxyPort)
        do {
            try sendAll(fd, [0x05, 0x01, 0x00])
            guard let method = try recvExact(fd, 2), method == [0x05, 0x00] else {
                throw Failure(message: "SOCKS method refused")
            }
            try sendAll(fd, [0x05, 0x01, 0x00, 0x01, 127, 0, 0, 1, UInt8(targetPort >> 8), UInt8(targetPort & 0xFF)])
            guard let head = try recvExact(fd, 4) else { throw Failure(message: "SOCKS reply missing") }
            guard head[1] == 0 else { throw Failure(message: "SOCKS reply \(head[1])") }
            let rest = head[3] == 1 ? 6 : head[3] == 4 ? 18 : 0
            guard rest > 0, try recvExact(fd, rest) != nil else { throw Failure(message: "SOCKS reply truncated") }
            return fd
        } catch {
            close(fd)
            throw error
        }
    }

    static func raiseFileLimit() {
        var limit = rlimit()
        if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(RLIMIT_NOFILE_VALUE, &limit)
        }
    }

    static var RLIMIT_NOFILE_VALUE: __rlimit_resource_t { __rlimit_resource_t(RLIMIT_NOFILE.rawValue) }
}

func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Starts a detached thread.
func spawn(_ body: @escaping @Sendable () -> Void) {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setstacksize(&attributes, 256 << 10)
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    let rc = pthread_create(
        &thread,
        &attributes,
        { raw in
            let box = Unmanaged<AnyObject>.fromOpaque(raw!).takeRetainedValue() as! Box
            box.body()
            return nil
        },
        box
    )
    precondition(rc == 0, "pthread_create failed")
    pthread_attr_destroy(&attributes)
}

extension Sock {
    /// HTTP CONNECT to 127.0.0.1:port through the proxy (RFC 9110 §9.3.6).
    static func httpConnect(proxyPort: UInt16, targetPort: UInt16) throws -> Int32 {
        let fd = try connect(port: proxyPort)
        do {
            try sendAll(
                fd,
                Array("CONNECT 127.0.0.1:\(targetPort) HTTP/1.1\r\nHost: 127.0.0.1:\(targetPort)\r\n\r\n".utf8)
            )
            var head: [UInt8] = []
            while !head.suffix(4).elementsEqual([13, 10, 13, 10]) {
                guard let byte = try recvExact(fd, 1) else { throw Failure(message: "proxy closed during CONNECT") }
                head += byte
                guard head.count < 4096 else { throw Failure(message: "CONNECT answer too long") }
            }
            guard String(decoding: head.prefix(12), as: UTF8.self).hasPrefix("HTTP/1.1 200") else {
                throw Failure(message: "CONNECT refused: \(String(decoding: head.prefix(40), as: UTF8.self))")
            }
            return fd
        } catch {
            close(fd)
            throw error
        }
    }

    /// SOCKS5 UDP ASSOCIATE: returns the control connection and the relay port on 127.0.0.1.
    static func socks5Associate(proxyPort: UInt16) throws -> (control: Int32, relayPort: UInt16) {
        let fd = try connect(port: proxyPort)
        do {
            try sendAll(fd, [0x05, 0x01, 0x00])
            guard try recvExact(fd, 2) == [0x05, 0x00] else { throw Failure(message: "SOCKS method refused") }
            try sendAll(fd, [0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
            guard let reply = try recvExact(fd, 10), reply[1] == 0, reply[3] == 1 else {
                throw Failure(message: "UDP ASSOCIATE refused")
            }
            return (fd, UInt16(reply[8]) << 8 | UInt16(reply[9]))
        } catch {
            close(fd)
            throw error
        }
    }

    static func udpSocket(timeoutMilliseconds: Int = 1000) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw Failure("socket") }
        var tv = timeval(tv_sec: timeoutMilliseconds / 1000, tv_usec: (timeoutMilliseconds % 1000) * 1000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var size: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        return fd
    }

    static func sendDatagram(_ fd: Int32, _ bytes: [UInt8], to port: UInt16) -> Bool {
        var addr = loopback(port: port)
        return bytes.withUnsafeBytes { raw in
            withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, raw.baseAddress!, raw.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                        == raw.count
                }
            }
        }
    }
}
