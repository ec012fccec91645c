import NIOCore
import NIOEmbedded
import Testing
import TunnelProtocol

@testable import TunnelTUN

#if canImport(Glibc)
import Glibc
#endif

struct PacketHeaderTests {
    func ipv4(source: [UInt8], destination: [UInt8], ihl: UInt8 = 5, length: Int = 40) -> ByteBuffer {
        var bytes = [UInt8](repeating: 0, count: max(length, 20))
        bytes[0] = 0x40 | ihl
        bytes.replaceSubrange(12..<16, with: source)
        bytes.replaceSubrange(16..<20, with: destination)
        return ByteBuffer(bytes: bytes.prefix(length))
    }

    @Test func readsIPv4Addresses() {
        let packet = self.ipv4(source: [10, 77, 0, 2], destination: [192, 0, 2, 7])
        #expect(IPPacket.source(of: packet) == PacketAddress(IPAddress.parse("10.77.0.2")!))
        #expect(IPPacket.destination(of: packet) == PacketAddress(IPAddress.parse("192.0.2.7")!))
    }

    @Test func readsIPv6Addresses() {
        var bytes = [UInt8](repeating: 0, count: 60)
        bytes[0] = 0x60
        let source = IPAddress.parse("fd00:77::2")!
        let destination = IPAddress.parse("2001:db8::1234:5678")!
        bytes.replaceSubrange(8..<24, with: source.bytes)
        bytes.replaceSubrange(24..<40, with: destination.bytes)
        let packet = ByteBuffer(bytes: bytes)
        #expect(IPPacket.source(of: packet) == PacketAddress(source))
        #expect(IPPacket.destination(of: packet) == PacketAddress(destination))
        #expect(PacketAddress(destination).ipAddress == destination)
    }

    @Test func rejectsWhatIsNotAnIPHeader() {
        #expect(IPPacket.source(of: ByteBuffer()) == nil)
        #expect(IPPacket.source(of: self.ipv4(source: [1, 2, 3, 4], destination: [5, 6, 7, 8], length: 19)) == nil)
        #expect(IPPacket.source(of: self.ipv4(source: [1, 2, 3, 4], destination: [5, 6, 7, 8], ihl: 4)) == nil)
        #expect(IPPacket.source(of: self.ipv4(source: [1, 2, 3, 4], destination: [5, 6, 7, 8], ihl: 15)) == nil)
        #expect(IPPacket.source(of: ByteBuffer(bytes: [0x60] + [UInt8](repeating: 0, count: 38))) == nil)
        #expect(IPPacket.source(of: ByteBuffer(bytes: [0x20] + [UInt8](repeating: 0, count: 60))) == nil)
    }

    @Test func tellsTCPFromOtherProtocols() {
        var v4 = [UInt8](self.ipv4(source: [10, 0, 0, 1], destination: [10, 0, 0, 2]).readableBytesView)
        v4[9] = 6
        #expect(IPPacket.isTCP(ByteBuffer(bytes: v4)))
        v4[9] = 1  // ICMP
        #expect(!IPPacket.isTCP(ByteBuffer(bytes: v4)))
        var v6 = [UInt8](repeating: 0, count: 60)
        v6[0] = 0x60
        v6[6] = 6
        #expect(IPPacket.isTCP(ByteBuffer(bytes: v6)))
        v6[6] = 58  // ICMPv6
        #expect(!IPPacket.isTCP(ByteBuffer(bytes: v6)))
        #expect(!IPPacket.isTCP(ByteBuffer(bytes: v6.prefix(39))))
        #expect(!IPPacket.isTCP(ByteBuffer(bytes: v4.prefix(19))))
        #expect(!IPPacket.isTCP(ByteBuffer()))
    }

    @Test func readsFromASlice() {
        var buffer = ByteBuffer(bytes: [9, 9, 9])
        buffer.writeImmutableBuffer(self.ipv4(source: [10, 0, 0, 1], destination: [10, 0, 0, 2]))
        buffer.moveReaderIndex(forwardBy: 3)
        #expect(IPPacket.destination(of: buffer) == .v4(0x0A00_0002))
    }
}

/// A non-blocking SOCK_SEQPACKET socket pair (each send is one packet, each read returns one) stands in for a
/// TUN queue.
struct DeviceReadBackTests {
    @Test func readsQueuedPacketsInOrderThenNothing() throws {
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &fds) == 0)
        defer {
            close(fds[0])
            close(fds[1])
        }
        try #require(fcntl(fds[0], F_SETFL, O_NONBLOCK) == 0)
        let channel = EmbeddedChannel()
        var state = DeviceReadBack(descriptor: fds[0], packetCapacity: 2048)
        state.attached(to: channel)
        #expect(!state.ready)  // the channel is not active yet
        state.channel(active: true)
        #expect(state.ready)
        let none = state.readPacket()
        #expect(none == nil)  // empty queue: no packet, and no wait
        for n in 1...3 {
            let packet = [UInt8](repeating: UInt8(n), count: 100 * n)
            #expect(packet.withUnsafeBytes { write(fds[1], $0.baseAddress, $0.count) } == 100 * n)
        }
        for n in 1...3 {
            let read = state.readPacket()
            let packet = try #require(read)
            #expect(packet.readableBytes == 100 * n)
            #expect(packet.readableBytesView.allSatisfy { $0 == UInt8(n) })
        }
        let after = state.readPacket()
        #expect(after == nil)
    }

    @Test func notReadyWhileBusyOrAfterTheChannelClosed() {
        var state = DeviceReadBack(descriptor: -1, packetCapacity: 2048)
        state.channel(active: true)
        state.busy = true
        #expect(!state.ready)
        state.busy = false
        #expect(state.ready)
        state.channel(active: false)
        #expect(!state.ready)
    }

    @Test func drainsOnlyWhilePacketsComeCloseTogether() {
        var state = DeviceReadBack(descriptor: -1, packetCapacity: 2048)
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        let quiet = start + .microseconds(100) + DeviceReadBack.busyGap
        let times = [start, start + .microseconds(50), start + .microseconds(100), quiet, quiet + .milliseconds(1)]
        let drains = times.map { state.delivered(at: $0) }
        // The first packet: nothing known about the queue yet. Then a burst: drain. Then a packet after a
        // quiet spell (a ping, a lone reply), where the drain would find nothing. The next one soon after:
        // busy again.
        #expect(drains == [false, true, true, false, true])
    }
}

struct AddressPoolTests {
    func key(_ n: UInt8) -> [UInt8] { [n] }

    @Test func leasesAreStablePerKeyAndDistinct() throws {
        var pool = try AddressPool<[UInt8]>(
            ipv4: IPAddress.parse("10.77.0.0")!,
            prefixLength: 24,
            ipv6: IPAddress.parse("fd00:1:2:77::")!
        )
        #expect(pool.capacity == 253)
        #expect(pool.gatewayV4 == PacketAddress(IPAddress.parse("10.77.0.1")!))
        #expect(pool.gatewayV6 == PacketAddress(IPAddress.parse("fd00:1:2:77::1")!))
        let leaseA = pool.lease(for: self.key(1), seed: 0)
        let leaseB = pool.lease(for: self.key(2), seed: 0)
        let a = try #require(leaseA)
        let b = try #require(leaseB)
        #expect(a.ipv4 == PacketAddress(IPAddress.parse("10.77.0.2")!))
        #expect(a.ipv6 == PacketAddress(IPAddress.parse("fd00:1:2:77::2")!))
        #expect(b.ipv4 == PacketAddress(IPAddress.parse("10.77.0.3")!))
        pool.release(self.key(1))
        // The same key gets the same address back, whatever its seed says.
        let again = pool.lease(for: self.key(1), seed: 99)
        #expect(again == a)
    }

    @Test func theSeedPicksTheFirstChoice() throws {
        var pool = try AddressPool<[UInt8]>(ipv4: IPAddress.parse("10.0.0.0")!, prefixLength: 16)
        let leased = pool.lease(for: self.key(1), seed: 1000)
        let lease = try #require(leased)
        #expect(lease.ipv4 == PacketAddress(IPAddress.parse("10.0.3.234")!))  // host 1002
        #expect(lease.ipv6 == nil)
    }

    @Test func aFullPoolReusesTheLeaseOfAnAbsentClientOnly() throws {
        var pool = try AddressPool<[UInt8]>(ipv4: IPAddress.parse("10.9.9.0")!, prefixLength: 30)
        #expect(pool.capacity == 1)
        let leased = pool.lease(for: self.key(1), seed: 0)
        let first = try #require(leased)
        let refused = pool.lease(for: self.key(2), seed: 0)
        #expect(refused == nil)
        pool.release(self.key(1))
        let reused = pool.lease(for: self.key(2), seed: 0)
        #expect(reused == first)
        #expect(pool.leaseCount == 1)
    }

    /// A client that left may be reconnecting (its apps' connections on its address wait for it): a full pool
    /// gives its address to another key only once its hold has passed, and gives it back to it meanwhile.
    @Test func aFullPoolKeepsAHeldLeaseForItsClientUntilTheHoldPasses() throws {
        var pool = try AddressPool<[UInt8]>(ipv4: IPAddress.parse("10.9.9.0")!, prefixLength: 30)
        let leased = pool.lease(for: self.key(1), seed: 0, now: 100)
        let first = try #require(leased)
        pool.release(self.key(1), heldUntil: 1_000)
        #expect(pool.lease(for: self.key(2), seed: 0, now: 999) == nil)
        #expect(pool.lease(for: self.key(1), seed: 0, now: 999) == first)
        // Back, and gone again: a new hold; after it passes, another key gets the address.
        pool.release(self.key(1), heldUntil: 2_000)
        #expect(pool.lease(for: self.key(2), seed: 0, now: 1_999) == nil)
        #expect(pool.lease(for: self.key(2), seed: 0, now: 2_000) == first)
        // The first key's lease is gone; its hold with it: the pool is full of a connected client.
        #expect(pool.lease(for: self.key(1), seed: 0, now: 3_000) == nil)
        pool.release(self.key(2))
        #expect(pool.lease(for: self.key(1), seed: 0, now: 3_000) == first)
    }

    @Test func hostBitsOfTheNetworkAreIgnored() throws {
        var pool = try AddressPool<[UInt8]>(ipv4: IPAddress.parse("10.77.0.200")!, prefixLength: 24)
        let lease = pool.lease(for: self.key(1), seed: 0)
        #expect(lease?.ipv4 == PacketAddress(IPAddress.parse("10.77.0.2")!))
    }

    @Test func slotMapFindsTheLeaseOfEitherAddress() throws {
        var pool = try AddressPool<[UInt8]>(
            ipv4: IPAddress.parse("10.77.0.0")!,
            prefixLength: 24,
            ipv6: IPAddress.parse("fd00:1:2:77::")!
        )
        let map = pool.slotMap
        for n in UInt8(1)...5 {
            let leased = pool.lease(for: self.key(n), seed: UInt64(n) * 40)
            let lease = try #require(leased)
            let ipv6 = try #require(lease.ipv6)
            #expect(map.slot(of: lease.ipv4) == lease.slot)
            #expect(map.slot(of: ipv6) == lease.slot)
        }
        #expect(map.slot(of: PacketAddress(IPAddress.parse("10.77.0.2")!)) == 0)
        #expect(map.slot(of: PacketAddress(IPAddress.parse("10.77.0.254")!)) == 252)
        // Not client addresses: network, gateway, broadcast, neighbours, other networks.
        for text in [
            "10.77.0.0", "10.77.0.1", "10.77.0.255", "10.77.1.2", "10.76.255.255", "0.0.0.0", "255.255.255.255",
            "fd00:1:2:77::1", "fd00:1:2:77::", "fd00:1:2:77::ff", "fd00:1:2:78::2", "fd00:1:2:77:1::2", "::2",
        ] {
            #expect(map.slot(of: PacketAddress(IPAddress.parse(text)!)) == nil, "\(text)")
        }
    }

    @Test func slotMapWithoutIPv6() throws {
        let pool = try AddressPool<[UInt8]>(ipv4: IPAddress.parse("10.9.9.0")!, prefixLength: 30)
        #expect(pool.slotMap.slot(of: PacketAddress(IPAddress.parse("10.9.9.2")!)) == 0)
        #expect(pool.slotMap.slot(of: PacketAddress(IPAddress.parse("10.9.9.3")!)) == nil)
        #expect(pool.slotMap.slot(of: PacketAddress(IPAddress.parse("fd00::2")!)) == nil)
    }

    @Test func refusesUnusableNetworks() {
        #expect(throws: AddressPool<[UInt8]>.PoolError.self) {
            try AddressPool<[UInt8]>(ipv4: IPAddress.parse("10.0.0.0")!, prefixLength: 31)
        }
        #expect(throws: AddressPool<[UInt8]>.PoolError.self) {
            try AddressPool<[UInt8]>(ipv4: IPAddress.parse("fd00::")!, prefixLength: 24)
        }
        #expect(throws: AddressPool<[UInt8]>.PoolError.self) {
            try AddressPool<[UInt8]>(
                ipv4: IPAddress.parse("10.0.0.0")!,
                prefixLength: 24,
                ipv6: IPAddress.parse("10.1.0.0")!
            )
        }
    }
}

struct HostChangeJournalTests {
    static let here = HostIdentity.current()

    /// A fresh directory of our own (mode 0700) for a state file, removed by `cleanup`.
    static func scratch() -> (directory: String, cleanup: () -> Void) {
        let directory = "/tmp/tunnel-journal-test-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(directory, 0o700)
        return (directory, { _ = SystemCommand.run(["rm", "-rf", directory]) })
    }

    @Test func stateFileRoundTrips() {
        let undos: [HostChangeJournal.Undo] = [
            .command(["ip", "-4", "route", "del", "192.0.2.1/32", "via", "10.0.0.1", "dev", "eth0"]),
            .command(["nft", "delete", "table", "inet", "x"]),
            .restoreFile(
                path: "/etc/resolv.conf",
                original: Array("nameserver 1.1.1.1\n".utf8),
                written: Array("nameserver 10.77.0.1\n".utf8)
            ),
            .restoreFile(
                path: "/proc/sys/net/ipv4/ip_forward",
                original: Array("0\n".utf8),
                written: Array("1\n".utf8)
            ),
            .restoreSymlink(path: "/etc/resolv.conf", target: "../run/systemd/resolve/stub-resolv.conf", written: []),
            .removeFile(path: "/etc/netns/x y/resolv.conf", written: [0, 1, 255]),
        ]
        let text = HostChangeJournal.encode(undos, identity: Self.here)
        #expect(HostChangeJournal.decode(text)?.undos == undos)
        #expect(HostChangeJournal.decode(text)?.identity == Self.here)
        #expect(HostChangeJournal.decode("something else\n") == nil)
        let host = "host \(Self.here.boot) 1 2"
        #expect(HostChangeJournal.decode(HostChangeJournal.header + "\n\(host)\ncmd zz\n") == nil)
        #expect(HostChangeJournal.decode(HostChangeJournal.header + "\n\(host)\nfile 00\n") == nil)
        // Without the host line, a version 2 file is not ours.
        #expect(HostChangeJournal.decode(HostChangeJournal.header + "\n") == nil)
        // A version 1 file (no host line) is read, with no identity (so its commands are never run).
        let old = HostChangeJournal.decode(
            HostChangeJournal.headerVersion1 + "\ncmd \(HostChangeJournal.hex(Array("ip".utf8)))\n"
        )
        #expect(old?.undos == [.command(["ip"])] && old?.identity == nil)
    }

    @Test func onlyOurOwnToolsAndFilesAreAccepted() {
        func line(_ words: [String]) -> String {
            HostChangeJournal.header + "\nhost b 1 2\ncmd "
                + words.map { HostChangeJournal.hex(Array($0.utf8)) }.joined(separator: " ") + "\n"
        }
        #expect(HostChangeJournal.decode(line(["ip", "link", "del", "x"])) != nil)
        #expect(HostChangeJournal.decode(line(["nft", "delete", "table", "inet", "x"])) != nil)
        for tool in ["sh", "/bin/sh", "/usr/sbin/ip", "bash", "python3", "ip6tables", "IP"] {
            #expect(HostChangeJournal.decode(line([tool, "-c", "id"])) == nil, "\(tool)")
        }
        func file(_ path: String) -> String {
            HostChangeJournal.header + "\nhost b 1 2\nfile \(HostChangeJournal.hex(Array(path.utf8))) 00 01\n"
        }
        #expect(HostChangeJournal.decode(file("/etc/resolv.conf")) != nil)
        #expect(HostChangeJournal.decode(file("/proc/sys/net/ipv6/conf/all/forwarding")) != nil)
        for path in [
            "/etc/shadow", "/root/.ssh/authorized_keys", "/proc/sys/kernel/core_pattern",
            "/proc/sys/net/../kernel/modprobe",
            "resolv.conf", "/etc/../etc/passwd/resolv.conf",
        ] {
            #expect(HostChangeJournal.decode(file(path)) == nil, "\(path)")
        }
    }

    @Test func rollbackRestoresFilesInReverseOrderUnlessRewrittenSince() throws {
        let (directory, cleanup) = Self.scratch()
        defer { cleanup() }
        let path = directory + "/state"
        mkdir(directory + "/a", 0o700)
        mkdir(directory + "/b", 0o700)
        let file = directory + "/a/resolv.conf"
        let other = directory + "/b/resolv.conf"
        HostChangeJournal.writeFile(file, Array("original\n".utf8), mode: 0o644, create: true)
        HostChangeJournal.writeFile(other, Array("theirs\n".utf8), mode: 0o644, create: true)

        let journal = HostChangeJournal(path: path)
        journal.record(.restoreFile(path: file, original: Array("original\n".utf8), written: Array("ours\n".utf8)))
        HostChangeJournal.writeFile(file, Array("ours\n".utf8), mode: 0o644, create: false)
        // Somebody else rewrote this one after us: theirs stays.
        journal.record(.restoreFile(path: other, original: Array("before\n".utf8), written: Array("ours\n".utf8)))
        #expect(HostChangeJournal.readFile(path) != nil)

        // A crash: a new process recovers from the state file.
        let recovered = try HostChangeJournal.recover(path: path)
        #expect(recovered.undone == 2)
        #expect(recovered.problems.isEmpty)
        #expect(HostChangeJournal.readFile(file) == Array("original\n".utf8))
        #expect(HostChangeJournal.readFile(other) == Array("theirs\n".utf8))
        #expect(HostChangeJournal.readFile(path) == nil)
        #expect(try HostChangeJournal.recover(path: path).undone == 0)
    }

    /// A state file written in another network namespace (or boot) that happens to have the same inode
    /// number: its commands are not run, its files are put back only if they still hold what we wrote.
    @Test func commandsFromAnotherNamespaceOrBootAreNotRun() throws {
        let (directory, cleanup) = Self.scratch()
        defer { cleanup() }
        mkdir(directory + "/etc", 0o700)
        let resolver = directory + "/etc/resolv.conf"
        HostChangeJournal.writeFile(resolver, Array("ours\n".utf8), mode: 0o644, create: true)
        // A command that fails (an address that does not parse) and so shows in `problems` when it runs.
        let command = HostChangeJournal.Undo.command(["ip", "-4", "addr", "del", "999.1.1.1/32", "dev", "lo"])
        let file = HostChangeJournal.Undo.restoreFile(
            path: resolver,
            original: Array("theirs\n".utf8),
            written: Array("ours\n".utf8)
        )
        var others = [
            HostIdentity(
                boot: Self.here.boot,
                namespaceInode: Self.here.namespaceInode,
                namespaceCookie: Self.here.namespaceCookie &+ 1
            ),
            HostIdentity(
                boot: "another-boot",
                namespaceInode: Self.here.namespaceInode,
                namespaceCookie: Self.here.namespaceCookie
            ),
        ]
        others.append(
            HostIdentity(
                boot: Self.here.boot,
                namespaceInode: Self.here.namespaceInode &+ 1,
                namespaceCookie: Self.here.namespaceCookie
            )
        )
        for identity in others {
            let path = directory + "/state"
            HostChangeJournal.writeFile(
                path,
                Array(HostChangeJournal.encode([command, file], identity: identity).utf8),
                mode: 0o600,
                create: true
            )
            HostChangeJournal.writeFile(resolver, Array("ours\n".utf8), mode: 0o644, create: false)
            let recovery = try HostChangeJournal.recover(path: path)
            #expect(
                recovery.skipped == 1 && recovery.undone == 1 && recovery.problems.isEmpty,
                "\(identity): \(recovery)"
            )
            #expect(HostChangeJournal.readFile(resolver) == Array("theirs\n".utf8))
            #expect(HostChangeJournal.readFile(path) == nil)
        }
        // The same namespace and boot: the command runs (and fails: it is only there to show it ran).
        let path = directory + "/state"
        HostChangeJournal.writeFile(
            path,
            Array(HostChangeJournal.encode([command], identity: Self.here).utf8),
            mode: 0o600,
            create: true
        )
        let recovery = try HostChangeJournal.recover(path: path)
        #expect(recovery.skipped == 0 && recovery.problems.count == 1, "\(recovery)")
    }

    @Test func recoveryRefusesStateFilesOthersCouldHaveWritten() throws {
        let (directory, cleanup) = Self.scratch()
        defer { cleanup() }
        let text = Array(
            HostChangeJournal.encode([.command(["ip", "link", "del", "nonexistent0"])], identity: Self.here).utf8
        )
        func refused(_ path: String) -> String? {
            do {
                _ = try HostChangeJournal.recover(path: path)
                return nil
            } catch {
                return error.reason
            }
        }
        // Group- or world-writable.
        let writable = directory + "/writable.state"
        HostChangeJournal.writeFile(writable, text, mode: 0o600, create: true)
        chmod(writable, 0o620)
        #expect(refused(writable)?.contains("written by group or others") == true)
        #expect(HostChangeJournal.readFile(writable) != nil, "a refused file is left alone")
        // A symbolic link (to a file that would pass).
        let target = directory + "/target.state"
        HostChangeJournal.writeFile(target, text, mode: 0o600, create: true)
        symlink(target, directory + "/link.state")
        #expect(refused(directory + "/link.state")?.contains("symbolic link") == true)
        #expect(HostChangeJournal.readFile(target) != nil)
        // In a directory others can write to (like /tmp).
        let open = directory + "/open"
        mkdir(open, 0o700)
        chmod(open, 0o777)
        HostChangeJournal.writeFile(open + "/x.state", text, mode: 0o600, create: true)
        #expect(refused(open + "/x.state")?.contains("its directory can be written by group or others") == true)
        if geteuid() == 0 {
            // Owned by another user.
            let foreign = directory + "/foreign.state"
            HostChangeJournal.writeFile(foreign, text, mode: 0o600, create: true)
            chown(foreign, 65534, 65534)
            #expect(refused(foreign)?.contains("belongs to uid 65534") == true)
        }
    }

    /// The state file is written through a new temporary file: a link planted at its name is not followed.
    @Test func savingDoesNotFollowAPlantedLink() throws {
        let (directory, cleanup) = Self.scratch()
        defer { cleanup() }
        let victim = directory + "/victim"
        HostChangeJournal.writeFile(victim, Array("precious\n".utf8), mode: 0o644, create: true)
        let path = directory + "/x.state"
        symlink(victim, path + ".tmp")
        let journal = HostChangeJournal(path: path)
        journal.record(.command(["ip", "link", "del", "nonexistent0"]))
        #expect(HostChangeJournal.readFile(victim) == Array("precious\n".utf8))
        #expect(
            HostChangeJournal.decode(String(decoding: HostChangeJournal.readFile(path) ?? [], as: UTF8.self))?.undos
                .count == 1
        )
        var info = stat()
        #expect(lstat(path, &info) == 0 && info.st_mode & 0o777 == 0o600 && (info.st_mode & S_IFMT) == S_IFREG)
    }
}

struct HostNetworkTests {
    @Test func parsesRouteGet() {
        #expect(
            HostNetwork.parseRouteGet("203.0.113.5 via 192.168.1.1 dev wlan0 src 192.168.1.20 uid 0 \n    cache ")
                == HostNetwork.Path(gateway: "192.168.1.1", device: "wlan0")
        )
        #expect(
            HostNetwork.parseRouteGet("10.223.0.2 dev veth0 src 10.223.0.1 uid 0")
                == HostNetwork.Path(gateway: nil, device: "veth0")
        )
        #expect(
            HostNetwork.parseRouteGet(
                "2001:db8::1 from :: via fe80::1 dev eth0 proto ra src 2001:db8::9 metric 100 pref medium"
            )
                == HostNetwork.Path(gateway: "fe80::1", device: "eth0")
        )
        #expect(
            HostNetwork.parseRouteGet("8.8.8.8 via inet6 fe80::1 dev eth0 src 10.0.0.2")
                == HostNetwork.Path(gateway: "fe80::1", device: "eth0")
        )
        #expect(HostNetwork.parseRouteGet("local 127.0.0.1 dev lo table local src 127.0.0.1 uid 0") == nil)
        #expect(HostNetwork.parseRouteGet("unreachable 10.1.1.1") == nil)
        #expect(HostNetwork.parseRouteGet("") == nil)
    }

    @Test func resolverFileKeepsSearchAndOptions() {
        let original =
            "# generated\nnameserver 192.168.1.1\nnameserver fe80::1%eth0\nsearch lan example.com\noptions edns0\n"
        let rewritten = ResolverFile.rewrite(original, servers: [IPAddress.parse("10.77.0.1")!])
        #expect(ResolverFile.nameservers(in: rewritten) == [IPAddress.parse("10.77.0.1")!])
        #expect(rewritten.contains("search lan example.com\n"))
        #expect(rewritten.contains("options edns0\n"))
        #expect(!rewritten.contains("192.168.1.1"))
        #expect(
            ResolverFile.nameservers(in: original) == [IPAddress.parse("192.168.1.1")!, IPAddress.parse("fe80::1")!]
        )
    }

    @Test func firewallTablesNameTheirDeviceAndPools() {
        let server = FirewallRules.serverTable(
            name: "tunnel_server_tunnel0",
            device: "tunnel0",
            pool4: "10.77.0.0/24",
            pool6: "fd00:77::/64",
            gateways: [IPAddress.parse("10.77.0.1")!, IPAddress.parse("fd00:77::1")!]
        )
        #expect(server.contains("iifname != \"tunnel0\" ip daddr 10.77.0.1 meta l4proto { tcp, udp } th dport 53 drop"))
        #expect(server.contains("iifname != \"tunnel0\" ip6 daddr fd00:77::1 meta l4proto"))
        #expect(server.hasPrefix("table inet tunnel_server_tunnel0 {"))
        #expect(server.contains("ip saddr 10.77.0.0/24 oifname != \"tunnel0\" masquerade"))
        #expect(server.contains("ip6 saddr fd00:77::/64 oifname != \"tunnel0\" masquerade"))
        #expect(server.contains("maxseg size set rt mtu"))
        #expect(server.contains("iifname \"tunnel0\" oifname \"tunnel0\" drop"))
        // Packets conntrack cannot place (after a restart) are dropped, and no pool address leaves un-NATed.
        #expect(server.contains("iifname \"tunnel0\" ct state invalid drop"))
        #expect(server.contains("ip saddr 10.77.0.0/24 oifname != \"tunnel0\" drop"))
        let noV6 = FirewallRules.serverTable(name: "t", device: "tunnel0", pool4: "10.77.0.0/24", pool6: nil)
        #expect(!noV6.contains("ip6 saddr"))

        let killSwitch = FirewallRules.killSwitchTable(
            name: "ks",
            device: "tunnel1",
            server: IPAddress.parse("203.0.113.9")!,
            port: 7443,
            exclude: ["192.168.1.0/24", "fd00:1::/64"]
        )
        #expect(killSwitch.contains("oifname \"tunnel1\" accept"))
        #expect(killSwitch.contains("ip daddr 203.0.113.9 tcp dport 7443 accept"))
        #expect(killSwitch.contains("ip daddr 192.168.1.0/24 accept"))
        #expect(killSwitch.contains("ip6 daddr fd00:1::/64 accept"))
        #expect(killSwitch.contains("reject"))
    }
}

struct HostChangeLockTests {
    @Test func onlyOneOwnerAtATimeAndTheSecondLearnsWho() throws {
        let directory = "/tmp/tunnel-lock-test-\(getpid())"
        defer { FileManagerLite.removeTree(directory) }
        let state = "\(directory)/netns.state"
        let first = try HostChangeLock(statePath: state, program: "tunnel-client --full-tunnel")
        do {
            _ = try HostChangeLock(statePath: state, program: "tunnel-client --full-tunnel")
            Issue.record("a second owner got the lock")
        } catch let held as HostChangeLock.Held {
            #expect(held.ownerPID == getpid())
            #expect(held.description.contains("another tunnel-client --full-tunnel is running"))
        }
        first.release()
        // A child another test spawns at this moment holds a copy of the descriptor until its exec closes it
        // (O_CLOEXEC): the lock is free once every copy is closed, so allow a moment.
        var again: HostChangeLock? = nil
        for _ in 0..<100 where again == nil {
            again = try? HostChangeLock(statePath: state, program: "tunnel-client --full-tunnel")
            if again == nil { usleep(10_000) }
        }
        #expect(again != nil, "the lock is free again after its owner released it")
        again?.release()
    }
}

/// Removes a small test directory (no Foundation in this target).
enum FileManagerLite {
    static func removeTree(_ path: String) {
        unlink(path + "/netns.state.lock")
        rmdir(path)
    }
}

struct PacketRouterTests {
    final class Session {}

    func router(capacity prefix: Int = 29) throws -> PacketRouter<String, String> {
        PacketRouter(
            pool: try AddressPool<String>(
                ipv4: IPAddress.parse("10.9.0.0")!,
                prefixLength: prefix,
                ipv6: IPAddress.parse("fd00:9::")!,
                prefixLength: 64
            )
        )
    }

    @Test func packetsGoToTheSessionThatOwnsTheirDestination() throws {
        var router = try self.router()
        let a = Session()
        let b = Session()
        let leaseA = router.attach(key: "a", seed: 1, route: "session a", owner: ObjectIdentifier(a))!
        let leaseB = router.attach(key: "b", seed: 1, route: "session b", owner: ObjectIdentifier(b))!
        #expect(leaseA.slot != leaseB.slot)
        #expect(router.route(to: leaseA.ipv4) == "session a" && router.route(to: leaseA.ipv6!) == "session a")
        #expect(router.route(to: leaseB.ipv4) == "session b")
        // The gateway (host 1) and addresses outside the pool belong to no session.
        #expect(router.route(to: PacketAddress(IPAddress.parse("10.9.0.1")!)) == nil)
        #expect(router.route(to: PacketAddress(IPAddress.parse("10.8.0.2")!)) == nil)
    }

    @Test func aReconnectKeepsItsAddressAndAStaleDetachLeavesTheNewSessionAlone() throws {
        var router = try self.router()
        let old = Session()
        let new = Session()
        let first = router.attach(key: "a", seed: 7, route: "old", owner: ObjectIdentifier(old))!
        // The key reconnects before the old session is gone: same addresses, the new session takes over.
        let second = router.attach(key: "a", seed: 7, route: "new", owner: ObjectIdentifier(new))!
        #expect(second == first)
        router.detach(key: "a", owner: ObjectIdentifier(old), slot: first.slot)
        #expect(router.route(to: first.ipv4) == "new", "the old session's late detach must not unroute the new one")
        router.detach(key: "a", owner: ObjectIdentifier(new), slot: first.slot)
        #expect(router.route(to: first.ipv4) == nil)
        // Back later: the same address again.
        let third = router.attach(key: "a", seed: 7, route: "later", owner: ObjectIdentifier(new))!
        #expect(third == first)
    }

    @Test func aFullPoolRefusesANewKeyWhileEveryoneIsConnected() throws {
        var router = try self.router(capacity: 30)  // a /30 holds one client (.2; .1 is the gateway)
        var sessions: [Session] = []
        var leases: [AddressPool<String>.Lease] = []
        for i in 0..<8 {
            let session = Session()
            sessions.append(session)
            if let lease = router.attach(
                key: "k\(i)",
                seed: UInt64(i),
                route: "s\(i)",
                owner: ObjectIdentifier(session)
            ) {
                leases.append(lease)
            }
        }
        #expect(leases.count == router.pool.capacity)
        #expect(router.route(to: leases[0].ipv4) == "s0")
        router.removeAll()
        #expect(router.route(to: leases[0].ipv4) == nil)
    }
}
