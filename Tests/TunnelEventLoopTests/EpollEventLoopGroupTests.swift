import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Testing
import TunnelEventLoop

#if canImport(Glibc)
import Glibc
#endif

/// The server's shape: several loops, one listener handing connections out in turn, and a connection handed
/// from one channel (and loop) to another by a second descriptor (session resumption).
struct EpollEventLoopGroupTests {
    typealias Echo = EpollStreamChannelTests.Echo

    /// A blocking socket connected to `address`.
    static func connect(_ address: SocketAddress) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let result = address.withSockAddr { Glibc.connect(fd, $0, socklen_t($1)) }
        guard result == 0 else { throw IOError(errnoCode: errno, reason: "connect") }
        return fd
    }

    /// Sends `bytes`, half-closes, and returns what came back.
    static func echo(_ fd: Int32, _ bytes: [UInt8]) -> [UInt8] {
        EpollStreamChannelTests.send(fd, bytes)
        shutdown(fd, Int32(SHUT_WR))
        return EpollStreamChannelTests.receiveAll(fd)
    }

    @Test func theListenerHandsConnectionsToEachLoopInTurn() async throws {
        let group = try EpollEventLoopGroup(count: 3, name: "group-test")
        let channels = NIOLockedValueBox<[EpollStreamChannel]>([])
        let events = NIOLockedValueBox<[String]>([])
        let listener = try await EpollListener.bind(
            host: "127.0.0.1",
            port: 0,
            on: group.loops[0],
            children: group
        ) { channel in
            channel.loop.preconditionInEventLoop()
            try channel.syncOptions!.setOption(.allowRemoteHalfClosure, value: true)
            try channel.pipeline.syncOperations.addHandler(Echo(events: events))
            channels.withLockedValue { $0.append(channel) }
        }
        for round in 0..<6 {
            let fd = try Self.connect(listener.localAddress)
            let payload = [UInt8](repeating: UInt8(round), count: 100_000)
            #expect(Self.echo(fd, payload) == payload)
            close(fd)
        }
        let loops = channels.withLockedValue { $0.map { ObjectIdentifier($0.loop) } }
        #expect(loops.count == 6)
        for loop in group.loops {
            #expect(loops.filter { $0 == ObjectIdentifier(loop) }.count == 2)
        }
        await listener.close()
        try await group.shutdownGracefully()
    }

    /// Accepted connections have Nagle's algorithm off, as NIO's server bootstrap sets by default: the tunnel
    /// writes a record as soon as it is built, and a small one held back for an ACK waits 40 ms for it.
    @Test func acceptedConnectionsSendAtOnce() async throws {
        let loop = try EpollEventLoop()
        let channels = NIOLockedValueBox<[EpollStreamChannel]>([])
        let listener = try await EpollListener.bind(host: "127.0.0.1", port: 0, on: loop) { channel in
            channels.withLockedValue { $0.append(channel) }
        }
        let fd = try Self.connect(listener.localAddress)
        defer { close(fd) }
        try await Task.sleep(for: .milliseconds(50))
        let channel = try #require(channels.withLockedValue { $0.first })
        let noDelay = try await channel.getOption(.tcpOption(.tcp_nodelay)).get()
        #expect(noDelay != 0)
        await listener.close()
        try await loop.shutdownGracefully()
    }

    /// The epoll registrations of this process: (registered descriptor, inode of its file) per entry.
    static func epollEntries() -> [(descriptor: Int32, inode: UInt64)] {
        var entries: [(Int32, UInt64)] = []
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for name in names {
            guard
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)"))
                    == "anon_inode:[eventpoll]",
                let info = try? String(contentsOfFile: "/proc/self/fdinfo/\(name)", encoding: .utf8)
            else { continue }
            for line in info.split(separator: "\n") where line.hasPrefix("tfd:") {
                let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == ":" })
                guard let tfd = fields.firstIndex(of: "tfd").flatMap({ Int32(fields[$0 + 1]) }),
                    let ino = fields.firstIndex(of: "ino").flatMap({ UInt64(fields[$0 + 1], radix: 16) })
                else { continue }
                entries.append((tfd, ino))
            }
        }
        return entries
    }

    /// A channel whose socket was duplicated takes it out of epoll when it closes: closing its descriptor alone
    /// would leave the registration (the socket lives on in the copy) waking the loop for every packet. The
    /// copy then carries the connection on a channel of another loop.
    @Test func aDuplicatedSocketLeavesItsLoopAndGoesOnElsewhere() async throws {
        let group = try EpollEventLoopGroup(count: 2, name: "dup-test")
        let channels = NIOLockedValueBox<[EpollStreamChannel]>([])
        let events = NIOLockedValueBox<[String]>([])
        let listener = try await EpollListener.bind(host: "127.0.0.1", port: 0, on: group.loops[0]) { channel in
            try channel.syncOptions!.setOption(.allowRemoteHalfClosure, value: true)
            channels.withLockedValue { $0.append(channel) }
        }
        let fd = try Self.connect(listener.localAddress)
        defer { close(fd) }
        try await Task.sleep(for: .milliseconds(50))
        let first = try #require(channels.withLockedValue { $0.first })
        let original = first.descriptor
        let copy = try #require(try await group.loops[0].submit { first.duplicateDescriptor() }.get())
        var status = stat()
        #expect(fstat(copy, &status) == 0)
        let inode = UInt64(status.st_ino)
        #expect(Self.epollEntries().contains { $0.descriptor == original && $0.inode == inode })
        try await first.close()
        #expect(!Self.epollEntries().contains { $0.inode == inode })

        let second = group.loops[1]
        let adopted = try await second.submit {
            try EpollStreamChannel.adopt(copy, on: second) { channel in
                try channel.syncOptions!.setOption(.allowRemoteHalfClosure, value: true)
                try channel.pipeline.syncOperations.addHandler(Echo(events: events))
            }.get()
        }.get()
        let payload = [UInt8](repeating: 9, count: 300_000)
        #expect(Self.echo(fd, payload) == payload)
        try? await adopted.close()
        await listener.close()
        try await group.shutdownGracefully()
    }
}
