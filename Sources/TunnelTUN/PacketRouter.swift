/// The server's full-tunnel routing table (docs/PROTOCOL.md §5): which session owns each pool address.
///
/// A session attaches with its client key and gets that key's lease (the same addresses across reconnects);
/// a packet read from the device goes to the session that owns its destination, found by address
/// arithmetic on the pool (a slot index, no hashing). When a key reconnects, the new
/// session takes the slot over, and the old one's late detach leaves it alone. Pure: the caller keeps it
/// behind its lock.
public struct PacketRouter<Key: Hashable & Sendable, Route> {
    public private(set) var pool: AddressPool<Key>
    public let slots: AddressSlotMap
    /// The session of each slot, and who it is (to tell a replaced session's detach from the current one's).
    private var routes: [Route?]
    private var owners: [ObjectIdentifier?]

    public init(pool: AddressPool<Key>) {
        self.pool = pool
        self.slots = pool.slotMap
        self.routes = Array(repeating: nil, count: pool.capacity)
        self.owners = Array(repeating: nil, count: pool.capacity)
    }

    /// Routes the key's addresses to `route` (owned by `owner`); nil when every address is held by a
    /// connected client (or held for one that left). `seed` picks the key's first-choice slot (so it usually
    /// keeps its address across server restarts too); `now` is monotonic nanoseconds.
    public mutating func attach(
        key: Key,
        seed: UInt64,
        route: Route,
        owner: ObjectIdentifier,
        now: UInt64 = 0
    ) -> AddressPool<Key>.Lease? {
        guard let lease = self.pool.lease(for: key, seed: seed, now: now) else { return nil }
        self.routes[lease.slot] = route
        self.owners[lease.slot] = owner
        return lease
    }

    /// The session `owner` of `key` is gone. If a newer session of the key took the slot over, it stays.
    /// The key's addresses are kept from other keys until `heldUntil` (monotonic nanoseconds).
    public mutating func detach(key: Key, owner: ObjectIdentifier, slot: Int, heldUntil: UInt64 = 0) {
        guard self.routes.indices.contains(slot) else { return }
        if let current = self.owners[slot] {
            guard current == owner else { return }
            self.routes[slot] = nil
            self.owners[slot] = nil
        }
        self.pool.release(key, heldUntil: heldUntil)
    }

    /// The session that owns `destination`, if any.
    public func route(to destination: PacketAddress) -> Route? {
        guard let slot = self.slots.slot(of: destination) else { return nil }
        return self.routes[slot]
    }

    /// Every route is dropped (the device is closing).
    public mutating func removeAll() {
        for slot in self.routes.indices {
            self.routes[slot] = nil
            self.owners[slot] = nil
        }
    }
}

extension PacketRouter: Sendable where Route: Sendable {}
