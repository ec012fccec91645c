import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
import TunnelConfig
import TunnelProtocol
import TunnelTUN
import TunnelTestSupport

@testable import ClientRuntime

/// Answers the host commands of full-tunnel mode as `ip` and `nft` would, and records them: the client's
/// full tunnel runs in a test without root, a TUN device or a change to this host.
final class RecordingCommands: HostCommands {
    private let log = NIOLockedValueBox<[String]>([])

    var commands: [String] { self.log.withLockedValue { $0 } }

    func run(_ arguments: [String], input: String?) -> SystemCommand.Result {
        let line = arguments.joined(separator: " ")
        self.log.withLockedValue { $0.append(line) }
        if arguments.starts(with: ["ip", "-4", "route", "get"]) {
            return .init(status: 0, output: "\(arguments[4]) via 192.0.2.1 dev eth9 src 192.0.2.7 uid 0")
        }
        if arguments.starts(with: ["ip", "-6", "route", "get"]) {
            return .init(status: 2, output: "RTNETLINK answers: Network is unreachable")
        }
        return .init(status: 0, output: "")
    }
}

/// The tunnel the full tunnel sends packets into.
final class RecordingTunnel: PacketTunnel {
    var queued: [[UInt8]] = []
    var sent: [[UInt8]] = []
    var packetOffloadActive: Bool { false }
    func enqueueIPPacket(_ packet: ByteBuffer, offloadHeader: Bool) -> Bool {
        self.queued.append(Array(packet.readableBytesView))
        return true
    }
    func flushNow() {
        self.sent += self.queued
        self.queued.removeAll()
    }
}

struct ClientFullTunnelTests {
    /// An IPv4 packet (a bare header and `payload`) from `source` to `destination`.
    static func packet(from source: [UInt8], to destination: [UInt8], payload: [UInt8]) -> [UInt8] {
        let length = 20 + payload.count
        var header: [UInt8] = [0x45, 0, UInt8(length >> 8), UInt8(length & 0xFF), 0, 0, 0, 0, 64, 17, 0, 0]
        header += source + destination
        return header + payload
    }

    /// Waits (up to 30 s: the suite runs in parallel on a loaded machine) until `condition`, checked on
    /// `loop`, holds.
    static func eventually(on loop: any EventLoop, _ condition: @escaping @Sendable () -> Bool) async throws -> Bool {
        for _ in 0..<3000 {
            if try await loop.submit(condition).get() { return true }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        return false
    }

    @Test func anAssignmentRoutesEverythingIntoTheDeviceAndPacketsFlowBothWaysAndShutdownUndoesIt() async throws {
        let directory = NSTemporaryDirectory() + "fulltunnel-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(
            atPath: directory,
            withIntermediateDirectories: false,
            attributes: [.posixPermissions: 0o700]
        )
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let resolver = directory + "/resolv.conf"
        let original = "search example.test\nnameserver 192.0.2.53\n"
        try original.write(toFile: resolver, atomically: false, encoding: .utf8)

        var settings = ClientFullTunnelSettings()
        settings.enabled = true
        settings.killSwitch = true
        settings.stateFile = directory + "/state"
        let fixedSettings = settings
        let commands = RecordingCommands()
        let host = HostNetwork(commands: commands, resolverPath: resolver)
        let device = MemoryPacketDevice()
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let server = IPAddress.parse("198.51.100.9")!

        let objects = try await loop.submit {
            let fullTunnel = try ClientFullTunnel(
                eventLoop: loop,
                settings: fixedSettings,
                server: server,
                port: 4443,
                logger: Logger(label: "test"),
                device: device,
                host: host
            )
            return NIOLoopBound((fullTunnel, RecordingTunnel()), eventLoop: loop)
        }.get()
        // The kill switch is up before any assignment: only the tunnel and the server.
        let killSwitch = commands.commands.first { $0 == "nft -f -" }
        #expect(killSwitch != nil)

        let assignment = TunnelAssignment(
            ipv4: .init(address: IPAddress.parse("10.77.0.2")!, prefixLength: 24),
            mtu: 1400,
            dnsServers: [IPAddress.parse("10.77.0.1")!]
        )
        try await loop.submit { try objects.value.0.assigned(assignment, on: objects.value.1) }.get()
        let afterUp = commands.commands
        #expect(afterUp.contains("ip -4 route add 198.51.100.9/32 via 192.0.2.1 dev eth9"), "the server keeps its way")
        #expect(afterUp.contains("ip link set dev memtun0 mtu 1400"))
        #expect(afterUp.contains("ip -4 addr add 10.77.0.2/24 dev memtun0"))
        #expect(afterUp.contains("ip -4 route add 0.0.0.0/1 dev memtun0"))
        #expect(afterUp.contains("ip -4 route add 128.0.0.0/1 dev memtun0"))
        let pointed = (try String(contentsOfFile: resolver, encoding: .utf8))
        #expect(pointed.contains("nameserver 10.77.0.1") && !pointed.contains("192.0.2.53"))
        #expect(pointed.contains("search example.test"), "search lines stay")

        // An app's packet from the assigned address goes into the tunnel; one from another source does not.
        let own = Self.packet(from: [10, 77, 0, 2], to: [203, 0, 113, 5], payload: Array("hello".utf8))
        let stray = Self.packet(from: [169, 254, 0, 9], to: [203, 0, 113, 5], payload: [1])
        #expect(device.inject(stray))
        #expect(device.inject(own))
        #expect(try await Self.eventually(on: loop) { objects.value.1.sent.count == 1 })
        #expect(try await loop.submit { objects.value.1.sent }.get() == [own])

        // A packet from the server reaches the device whole.
        let reply = Self.packet(from: [203, 0, 113, 5], to: [10, 77, 0, 2], payload: Array(repeating: 7, count: 1300))
        try await loop.submit { objects.value.0.packetFromTunnel(ByteBuffer(bytes: reply)) }.get()
        #expect(device.receive() == reply)

        // Shutdown undoes what was journalled, newest first, and puts the resolver file back.
        let before = commands.commands.count
        try await loop.submit { objects.value.0.shutdown() }.get()
        let undone = Array(commands.commands[before...])
        #expect(undone.contains("ip -4 route del 198.51.100.9/32 via 192.0.2.1 dev eth9"))
        #expect(undone.last == "nft delete table inet tunnel_client_killswitch", "the kill switch goes last")
        #expect((try String(contentsOfFile: resolver, encoding: .utf8)) == original)
        #expect(
            !FileManager.default.fileExists(atPath: directory + "/state"),
            "the state file is gone after a clean exit"
        )
    }
}
