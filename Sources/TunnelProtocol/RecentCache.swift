import NIOCore

/// A bounded map of things seen lately: an entry expires `lifetime` after it was last stored, and when more
/// than `capacity` keys are held the one stored longest ago leaves first. Pure: the caller passes the time.
/// The client's fast-open destinations and the server's resolved names are kept in one.
public struct RecentCache<Key: Hashable, Value> {
    public let capacity: Int
    public let lifetime: TimeAmount
    /// Each key's value and when it was last stored.
    private var entries: [Key: (value: Value, at: NIODeadline)] = [:]
    /// Stores in the order they happened; an entry whose time is no longer its key's is stale and skipped.
    /// Compacted when it grows to twice the capacity.
    private var order = CircularBuffer<(key: Key, at: NIODeadline)>(initialCapacity: 16)

    public init(capacity: Int, lifetime: TimeAmount) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.lifetime = lifetime
    }

    /// Keys held now (expired ones included until newer stores push them out).
    public var count: Int { self.entries.count }

    /// The value stored for `key` within the lifetime before `now`.
    public func value(for key: Key, now: NIODeadline) -> Value? {
        guard let entry = self.entries[key], now - entry.at < self.lifetime else { return nil }
        return entry.value
    }

    /// Stores `value` for `key` at `now`.
    public mutating func store(_ value: Value, for key: Key, now: NIODeadline) {
        self.entries[key] = (value, now)
        self.order.append((key, now))
        while self.entries.count > self.capacity, let oldest = self.order.popFirst() {
            if self.entries[oldest.key]?.at == oldest.at { self.entries.removeValue(forKey: oldest.key) }
        }
        if self.order.count > 2 * self.capacity {
            // Stale entries (keys stored again, or removed since) make up at least half.
            self.order = CircularBuffer(self.order.filter { self.entries[$0.key]?.at == $0.at })
        }
    }

    /// Forgets `key`.
    public mutating func remove(_ key: Key) {
        self.entries.removeValue(forKey: key)
    }
}
