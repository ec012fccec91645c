import NIOCore
import TunnelProtocol

/// Which destinations the client may open with early data (issue 18, README *Fast open*): those the server
/// connected to successfully a little while ago. For them the application is answered at once and its first
/// bytes go with the OPEN; anywhere else it waits for the server's real answer, with its exact reply code.
///
/// Bounded: at most `capacity` destinations, the one that succeeded longest ago leaving first; an entry
/// expires `lifetime` after its last success, and a failure removes it (so the next attempt waits for the real
/// answer). Keyed by the destination as the application named it (host name or address, and port). Pure: the
/// caller passes the time.
public struct FastOpenCache {
    public let capacity: Int
    public let lifetime: TimeAmount
    /// The last success of each destination.
    private var lastSuccess: [TargetAddress: NIODeadline] = [:]
    /// Successes in the order they happened; an entry whose time is no longer the destination's last success
    /// is stale and skipped. Compacted when it grows to twice the capacity.
    private var order = CircularBuffer<(target: TargetAddress, at: NIODeadline)>(initialCapacity: 16)

    public init(capacity: Int = 4096, lifetime: TimeAmount = .minutes(10)) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.lifetime = lifetime
    }

    /// Destinations held now (expired ones included until newer successes push them out).
    public var count: Int { self.lastSuccess.count }

    /// Whether `target` succeeded within the lifetime before `now`.
    public func contains(_ target: TargetAddress, now: NIODeadline) -> Bool {
        guard let at = self.lastSuccess[target] else { return false }
        return now - at < self.lifetime
    }

    /// The server connected to `target` at `now`.
    public mutating func succeeded(_ target: TargetAddress, now: NIODeadline) {
        self.lastSuccess[target] = now
        self.order.append((target, now))
        while self.lastSuccess.count > self.capacity, let oldest = self.order.popFirst() {
            if self.lastSuccess[oldest.target] == oldest.at { self.lastSuccess.removeValue(forKey: oldest.target) }
        }
        if self.order.count > 2 * self.capacity {
            // Stale entries (destinations that succeeded again, or failed since) make up at least half.
            self.order = CircularBuffer(
                self.order.filter { self.lastSuccess[$0.target] == $0.at }
            )
        }
    }

    /// Opening `target` failed (or an early open of it did): the next attempt waits for the server's answer.
    public mutating func failed(_ target: TargetAddress) {
        self.lastSuccess.removeValue(forKey: target)
    }
}
