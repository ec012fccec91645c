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
    private var recent: RecentCache<TargetAddress, Void>

    public var capacity: Int { self.recent.capacity }
    public var lifetime: TimeAmount { self.recent.lifetime }

    public init(capacity: Int = 4096, lifetime: TimeAmount = .minutes(10)) {
        self.recent = RecentCache(capacity: capacity, lifetime: lifetime)
    }

    /// Destinations held now (expired ones included until newer successes push them out).
    public var count: Int { self.recent.count }

    /// Whether `target` succeeded within the lifetime before `now`.
    public func contains(_ target: TargetAddress, now: NIODeadline) -> Bool {
        self.recent.value(for: target, now: now) != nil
    }

    /// The server connected to `target` at `now`.
    public mutating func succeeded(_ target: TargetAddress, now: NIODeadline) {
        self.recent.store((), for: target, now: now)
    }

    /// Opening `target` failed (or an early open of it did): the next attempt waits for the server's answer.
    public mutating func failed(_ target: TargetAddress) {
        self.recent.remove(target)
    }
}
