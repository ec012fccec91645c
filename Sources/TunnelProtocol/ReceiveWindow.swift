import NIOCore

/// Receive-side credit for one stream or for the whole connection (docs/PROTOCOL.md §3.3).
///
/// Invariant: `available + buffered + consumedUnacknowledged == target`. The peer may send `available` more
/// bytes; `buffered` bytes have arrived but are not yet written to the local socket; credit for consumed bytes
/// goes back in one WINDOW_UPDATE once at least half the target is owed. So the bytes held for a reader that
/// stops reading never exceed `target`.
public struct ReceiveWindow: Hashable, Sendable {
    /// The window size currently granted.
    public private(set) var target: Int
    /// Largest the target may grow to by auto-tuning.
    public let maxTarget: Int
    /// Bytes the peer may still send.
    public private(set) var available: Int
    /// Bytes received and not yet consumed.
    public private(set) var buffered: Int = 0
    /// Bytes consumed and not yet returned to the peer.
    public private(set) var consumedUnacknowledged: Int = 0
    private var lastUpdate: NIODeadline? = nil

    public init(target: Int, maxTarget: Int? = nil) {
        precondition(target > 0 && target <= Int(Int32.max))
        self.target = target
        self.maxTarget = max(maxTarget ?? target, target)
        self.available = target
    }

    /// `n` bytes arrived. Throws if the peer overran its credit.
    public mutating func received(_ n: Int) throws(ProtocolError) {
        guard n <= self.available else {
            throw ProtocolError.flowControl("peer sent \(n) bytes with only \(self.available) of credit")
        }
        self.available -= n
        self.buffered += n
    }

    /// `n` buffered bytes were consumed. Returns the increment to announce now, if one is due.
    ///
    /// Auto-tune: when half a window was consumed within one round trip of the previous update, the reader
    /// drains faster than the window can cover the path (rate × RTT > window / 2), so the target doubles (up
    /// to `maxTarget`) and the increment includes the growth. `roundTrip` should be the path's minimum RTT.
    public mutating func consumed(_ n: Int, now: NIODeadline, roundTrip: TimeAmount?) -> UInt32? {
        // Never more than arrived: an accounting slip above must not corrupt the window (or crash).
        let n = min(n, self.buffered)
        self.buffered -= n
        self.consumedUnacknowledged += n
        guard self.consumedUnacknowledged >= self.target / 2 else { return nil }
        var increment = self.consumedUnacknowledged
        if self.target < self.maxTarget, let roundTrip, let last = self.lastUpdate,
            now - last < roundTrip
        {
            let grown = min(self.target * 2, self.maxTarget)
            increment += grown - self.target
            self.target = grown
        }
        self.lastUpdate = now
        self.consumedUnacknowledged = 0
        self.available += increment
        return UInt32(increment)
    }

    /// The stream is gone: its buffered bytes will never be consumed. Returns them (for the connection window).
    public mutating func releaseAll() -> Int {
        let released = self.buffered
        self.buffered = 0
        return released
    }
}

/// Send-side credit granted by the peer.
public struct SendCredit: Hashable, Sendable {
    /// Bytes that may be sent now.
    public private(set) var available: Int

    public init(_ initial: Int) { self.available = initial }

    /// Spends `n` bytes of credit.
    @inline(__always)
    public mutating func spend(_ n: Int) {
        precondition(n <= self.available)
        self.available -= n
    }

    /// Adds a WINDOW_UPDATE increment. Zero increments and growth past 2^31-1 are protocol errors.
    public mutating func grant(_ increment: UInt32) throws(ProtocolError) {
        guard increment > 0 else { throw ProtocolError.flowControl("zero window increment") }
        let next = self.available + Int(increment)
        guard next <= Int(Int32.max) else { throw ProtocolError.flowControl("window grew past 2^31-1") }
        self.available = next
    }
}
