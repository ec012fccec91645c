import TunnelProtocol

/// Hands out inner addresses to full-tunnel clients: one IPv4 address (and one IPv6 address when there is an
/// IPv6 pool) per client key, the same one each time the key reconnects.
///
/// Host 1 of each network is the server's own (the gateway, and its DNS forwarder). A key's first choice of
/// slot comes from the key itself, so a client usually keeps its address across server restarts too; a
/// taken slot moves it to the next free one. Leases outlive connections; when every slot is leased, the
/// lease of a client that is not connected is reused, once its hold (the server's resume grace: the client
/// may be reconnecting, its apps' connections on that address waiting) has passed.
public struct AddressPool<Key: Hashable>: Sendable where Key: Sendable {
    public struct Network: Hashable, Sendable, CustomStringConvertible {
        public var address: PacketAddress
        public var prefixLength: Int
        public var description: String { "\(self.address)/\(self.prefixLength)" }
    }

    /// What one client gets.
    public struct Lease: Hashable, Sendable {
        /// The lease's index, `0..<capacity`: what `AddressSlotMap.slot(of:)` gives for either address.
        public var slot: Int
        public var ipv4: PacketAddress
        public var ipv6: PacketAddress?
    }

    public enum PoolError: Error, Equatable, CustomStringConvertible {
        case notANetwork(String)
        case tooSmall(String)
        public var description: String {
            switch self {
            case .notANetwork(let why), .tooSmall(let why): why
            }
        }
    }

    public let ipv4: Network
    public let ipv6: Network?
    /// How many clients can hold an address at once.
    public let capacity: Int
    private var slotOf: [Key: Int] = [:]
    private var ownerOf: [Int: Key] = [:]
    private var active: Set<Key> = []
    /// Until when (monotonic nanoseconds) the lease of a key that left is kept from other keys.
    private var heldUntil: [Key: UInt64] = [:]

    /// Most clients a pool serves (a /12 would otherwise mean a million slots).
    public static var maxCapacity: Int { 1 << 16 }

    /// - Parameters: the IPv4 network (prefix 8...30) and an optional IPv6 network (prefix 48...120). Host
    ///   bits of the given addresses are ignored.
    public init(
        ipv4: IPAddress,
        prefixLength v4Prefix: Int,
        ipv6: IPAddress? = nil,
        prefixLength v6Prefix: Int = 64
    ) throws(PoolError) {
        guard !ipv4.isIPv6, (8...30).contains(v4Prefix) else {
            throw .notANetwork(
                "the IPv4 pool must be an IPv4 network with a prefix from /8 to /30, not \(ipv4)/\(v4Prefix)"
            )
        }
        guard case .v4(let v4) = PacketAddress(ipv4) else { throw .notANetwork("\(ipv4)") }
        let v4Mask: UInt32 = v4Prefix == 0 ? 0 : ~UInt32(0) << (32 - v4Prefix)
        self.ipv4 = Network(address: .v4(v4 & v4Mask), prefixLength: v4Prefix)
        var capacity = (1 << (32 - v4Prefix)) - 3  // network, gateway, broadcast
        if let ipv6 {
            guard ipv6.isIPv6, (48...120).contains(v6Prefix) else {
                throw .notANetwork(
                    "the IPv6 pool must be an IPv6 network with a prefix from /48 to /120, not \(ipv6)/\(v6Prefix)"
                )
            }
            guard case .v6(let high, let low) = PacketAddress(ipv6) else { throw .notANetwork("\(ipv6)") }
            let hostBits = 128 - v6Prefix
            let lowMask: UInt64 = hostBits >= 64 ? 0 : ~UInt64(0) << hostBits
            let highMask: UInt64 = hostBits <= 64 ? ~0 : ~UInt64(0) << (hostBits - 64)
            self.ipv6 = Network(address: .v6(high & highMask, low & lowMask), prefixLength: v6Prefix)
            if hostBits < 30 { capacity = min(capacity, (1 << hostBits) - 2) }
        } else {
            self.ipv6 = nil
        }
        self.capacity = min(capacity, Self.maxCapacity)
        guard self.capacity >= 1 else { throw .tooSmall("the pool has no room for a client") }
    }

    /// The server's own addresses (host 1).
    public var gatewayV4: PacketAddress { self.address(v4Host: 1) }
    public var gatewayV6: PacketAddress? { self.ipv6.map { _ in self.address(v6Host: 1)! } }

    /// Gives `key` its address (the one it had before, if any) and marks it connected. `seed` picks the
    /// first slot to try (derive it from the key, so it is stable across restarts). Nil when every slot
    /// belongs to a connected client or to one whose hold lasts beyond `now` (monotonic nanoseconds).
    public mutating func lease(for key: Key, seed: UInt64, now: UInt64 = 0) -> Lease? {
        if let slot = self.slotOf[key] {
            self.active.insert(key)
            self.heldUntil.removeValue(forKey: key)
            return self.lease(slot: slot)
        }
        let start = Int(seed % UInt64(self.capacity))
        var candidate: Int? = nil
        for step in 0..<self.capacity {
            let slot = (start + step) % self.capacity
            guard let owner = self.ownerOf[slot] else {
                candidate = slot
                break
            }
            if candidate == nil, !self.active.contains(owner), self.heldUntil[owner] ?? 0 <= now {
                // Remember the first slot whose owner is away (and not held), in case no slot is free.
                candidate = slot
            }
        }
        guard let slot = candidate else { return nil }
        if let previous = self.ownerOf[slot] {
            self.slotOf.removeValue(forKey: previous)
            self.heldUntil.removeValue(forKey: previous)
        }
        self.ownerOf[slot] = key
        self.slotOf[key] = slot
        self.active.insert(key)
        return self.lease(slot: slot)
    }

    /// `key` disconnected: its lease stays, but may be reused when the pool is full, after `heldUntil`
    /// (monotonic nanoseconds; 0: at once).
    public mutating func release(_ key: Key, heldUntil: UInt64 = 0) {
        self.active.remove(key)
        if heldUntil > 0 { self.heldUntil[key] = heldUntil } else { self.heldUntil.removeValue(forKey: key) }
    }

    /// Number of keys holding a lease.
    public var leaseCount: Int { self.slotOf.count }

    private func lease(slot: Int) -> Lease {
        Lease(slot: slot, ipv4: self.address(v4Host: slot + 2), ipv6: self.address(v6Host: slot + 2))
    }

    /// Maps client addresses to slots by arithmetic alone, for the per-packet routing (no hashing, no lock).
    public var slotMap: AddressSlotMap {
        guard case .v4(let v4) = self.ipv4.address else { preconditionFailure() }
        var v6Network: (UInt64, UInt64)? = nil
        if let v6 = self.ipv6, case .v6(let high, let low) = v6.address { v6Network = (high, low) }
        return AddressSlotMap(v4Network: v4, v6High: v6Network?.0, v6Low: v6Network?.1 ?? 0, capacity: self.capacity)
    }

    private func address(v4Host host: Int) -> PacketAddress {
        guard case .v4(let network) = self.ipv4.address else { preconditionFailure() }
        return .v4(network + UInt32(host))
    }

    private func address(v6Host host: Int) -> PacketAddress? {
        guard let v6 = self.ipv6, case .v6(let high, let low) = v6.address else { return nil }
        return .v6(high, low + UInt64(host))
    }
}

/// Which pool slot an address belongs to: slot `n` holds host `n + 2` of each network (host 1 is the gateway).
public struct AddressSlotMap: Sendable, Hashable {
    @usableFromInline let v4Network: UInt32
    @usableFromInline let v6High: UInt64?
    @usableFromInline let v6Low: UInt64
    public let capacity: Int

    /// The slot of a client address of the pool; nil for any other address (the gateway, the network and
    /// broadcast addresses, hosts past the pool's capacity, other networks).
    @inlinable
    public func slot(of address: PacketAddress) -> Int? {
        let host: UInt64
        switch address {
        case .v4(let value):
            host = UInt64(value &- self.v4Network)  // wraps to a huge value below the network
        case .v6(let high, let low):
            guard high == self.v6High else { return nil }
            host = low &- self.v6Low
        }
        guard host >= 2, host - 2 < UInt64(self.capacity) else { return nil }
        return Int(host - 2)
    }
}
