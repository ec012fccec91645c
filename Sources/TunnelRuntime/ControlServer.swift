import Logging
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The running process's control socket (README, *Operating it*): a Unix socket of mode 0600, never on the
/// network, where `status` and `reload` ask it things. One request per connection: a line of text (`status`,
/// `status streams`, `reload`), answered with one JSON document, then the connection closes. Only the socket's
/// own user (and root) may talk to it: the file mode keeps others from connecting, and each connection's peer
/// credentials are checked too.
public final class ControlServer: Sendable {
    /// Answers one request line (on the server's event loop).
    public typealias Responder = @Sendable (String) -> EventLoopFuture<String>

    public let path: String
    private let channel: any Channel
    private let inode: UInt64

    private init(path: String, channel: any Channel, inode: UInt64) {
        self.path = path
        self.channel = channel
        self.inode = inode
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Where `program` keeps its control socket unless told: /run for root, the user's runtime directory
    /// otherwise (XDG_RUNTIME_DIR), else /tmp with the user id in the name.
    public static func defaultPath(program: String) -> String {
        if geteuid() == 0 { return "/run/\(program).sock" }
        if let runtime = getenv("XDG_RUNTIME_DIR").map({ String(cString: $0) }), runtime.hasPrefix("/") {
            return "\(runtime)/\(program).sock"
        }
        return "/tmp/\(program)-\(geteuid()).sock"
    }

    /// Binds `path` (mode 0600) and serves requests with `respond`. A socket file left by a process that is
    /// gone is replaced; one a live process answers on is not (`Failure`), nor is any other file.
    public static func start(
        path: String,
        group: any EventLoopGroup,
        logger: Logger,
        respond: @escaping Responder
    ) async throws -> ControlServer {
        try Self.clearStale(path)
        // The socket is created with the umask's mode: 0600 from the start, no window for another user.
        let previous = umask(0o177)
        defer { umask(previous) }
        let channel: any Channel
        do {
            channel = try await ServerBootstrap(group: group)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ControlConnection(respond: respond))
                    }
                }
                .bind(unixDomainSocketPath: path)
                .get()
        } catch {
            throw Failure(description: "cannot listen on the control socket \(path): \(error)")
        }
        var info = stat()
        guard stat(path, &info) == 0 else {
            channel.close(promise: nil)
            throw Failure(description: "the control socket \(path) vanished after bind")
        }
        _ = chmod(path, 0o600)
        return ControlServer(path: path, channel: channel, inode: UInt64(info.st_ino))
    }

    /// Removes a socket file nobody answers on (a process that died left it); refuses a live one and a file
    /// that is not a socket.
    private static func clearStale(_ path: String) throws {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw Failure(description: "\(path) exists and is not a socket; not replacing it")
        }
        if ControlClient.isAnswering(path) {
            throw Failure(description: "another process serves the control socket \(path)")
        }
        unlink(path)
    }

    /// Stops listening and removes the socket file (if it is still this server's).
    public func stop() {
        self.channel.close(promise: nil)
        var info = stat()
        if stat(self.path, &info) == 0, UInt64(info.st_ino) == self.inode { unlink(self.path) }
    }
}

/// `struct ucred` (pid, uid, gid), which Glibc shows Swift only with _GNU_SOURCE.
private struct PeerCredentials: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}

/// One control connection: reads a request line, answers, closes.
private final class ControlConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let respond: ControlServer.Responder
    private var request = ByteBuffer()
    private var answered = false
    /// The peer's credentials were checked.
    private var allowed = false
    /// Longest request line.
    private static let limit = 1024

    init(respond: @escaping ControlServer.Responder) {
        self.respond = respond
    }

    func channelActive(context: ChannelHandlerContext) {
        // Mode 0600 keeps other users out; root may connect to anything, and is allowed.
        #if os(Linux)
        guard let provider = context.channel as? any SocketOptionProvider else {
            context.close(promise: nil)
            return
        }
        let credentials: EventLoopFuture<PeerCredentials> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET),
            name: SocketOptionName(SO_PEERCRED)
        )
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        credentials.whenComplete { result in
            let (handler, context) = bound.value
            guard case .success(let peer) = result, peer.uid == 0 || peer.uid == geteuid() else {
                context.close(promise: nil)
                return
            }
            handler.allowed = true
            handler.answerIfComplete(context: context)
        }
        #else
        self.allowed = true
        #endif
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.answered else { return }
        var bytes = self.unwrapInboundIn(data)
        self.request.writeBuffer(&bytes)
        self.answerIfComplete(context: context)
    }

    private func answerIfComplete(context: ChannelHandlerContext) {
        guard self.allowed, !self.answered else { return }
        guard let newline = self.request.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
            if self.request.readableBytes > Self.limit {
                self.answered = true
                let answer = ByteBuffer(string: "{\"error\": \"request longer than \(Self.limit) bytes\"}\n")
                // Half-close: more of the request may still come, and closing with it unread would reset the
                // connection (and lose the answer); it is read and dropped until the caller closes.
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                context.writeAndFlush(NIOAny(answer)).whenComplete { _ in
                    bound.value.close(mode: .output, promise: nil)
                }
            }
            return
        }
        self.answered = true
        let line = self.request.getString(at: self.request.readerIndex, length: newline - self.request.readerIndex)
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        self.respond((line ?? "").trimmingSpaces).hop(to: context.eventLoop).whenComplete { result in
            let context = bound.value
            let text: String
            switch result {
            case .success(let answer): text = answer
            case .failure(let error):
                let message = "\(error)".replacingQuotes
                text = "{\"error\": \"\(message)\"}"
            }
            context.writeAndFlush(NIOAny(ByteBuffer(string: text + "\n"))).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

extension String {
    /// Safe inside a JSON string: quotes and backslashes become apostrophes, control characters spaces.
    fileprivate var replacingQuotes: String {
        String(
            self.unicodeScalars.map { c -> Character in
                c == "\"" || c == "\\" ? "'" : c.value < 0x20 ? " " : Character(c)
            }
        )
    }

    fileprivate var trimmingSpaces: String {
        var s = Substring(self)
        while let first = s.first, first == " " || first == "\r" || first == "\t" { s = s.dropFirst() }
        while let last = s.last, last == " " || last == "\r" || last == "\t" { s = s.dropLast() }
        return String(s)
    }
}

/// The other end: connects to a control socket, sends a request, and reads the answer (used by `status` and
/// `reload`, blocking: they are short-lived commands).
public enum ControlClient {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Longest wait for an answer, in seconds.
    static let answerTimeout = 10

    /// Whether a process answers on `path` (a connect succeeds).
    public static func isAnswering(_ path: String) -> Bool {
        guard let fd = try? self.connect(path) else { return false }
        close(fd)
        return true
    }

    private static func connect(_ path: String) throws(Failure) -> Int32 {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { throw Failure(description: "\(path): path too long for a socket") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        let result = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard result == 0 else {
            let why = String(cString: strerror(errno))
            close(fd)
            throw Failure(description: "\(path): \(why)")
        }
        return fd
    }

    /// Sends `request` to the process on `path` and returns its answer. Refuses a socket owned by another
    /// user (it is not the process this user started: someone may have put it there to read the request).
    public static func ask(_ path: String, _ request: String) throws(Failure) -> String {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw Failure(
                description:
                    "no control socket at \(path) (\(String(cString: strerror(errno)))): is the program running?"
            )
        }
        guard info.st_mode & S_IFMT == S_IFSOCK else { throw Failure(description: "\(path) is not a socket") }
        guard info.st_uid == geteuid() || info.st_uid == 0 else {
            throw Failure(description: "\(path) belongs to another user (uid \(info.st_uid)); not talking to it")
        }
        let fd = try self.connect(path)
        defer { close(fd) }
        // A process that hangs must not hang the command too.
        var timeout = timeval(tv_sec: Self.answerTimeout, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var out = Array((request + "\n").utf8)
        let sent = out.withUnsafeMutableBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == out.count else { throw Failure(description: "\(path): cannot send the request") }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                throw Failure(description: "\(path): no answer within \(Self.answerTimeout) s")
            }
            guard count > 0 else { break }
            answer.append(contentsOf: chunk[0..<count])
            guard answer.count < 64 << 20 else { throw Failure(description: "\(path): answer too long") }
        }
        guard !answer.isEmpty else {
            throw Failure(description: "\(path): the process closed the connection without an answer")
        }
        return String(decoding: answer, as: UTF8.self)
    }
}
