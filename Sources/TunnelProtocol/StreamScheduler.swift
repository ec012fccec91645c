import NIOCore

/// Which stream sends next (docs/PROTOCOL.md §3.3, order of sending): two classes, each a round-robin queue.
///
/// A stream that is new, or that has sent little lately, is *interactive* and is served before *bulk* streams,
/// so a page's small responses do not queue behind a download. What "little lately" means is a token bucket
/// per stream: it may send `burst` bytes as interactive, refilled at `refillPerSecond`; once spent, the stream
/// is bulk until the bucket is positive again (what it sends as bulk still spends, down to one burst of
/// debt). A download therefore turns bulk after its first `burst` bytes and stays bulk while it keeps
/// sending faster than the refill, while a request/response stream, a terminal session or a new connection
/// stays interactive.
///
/// Bulk streams are never starved: while both classes wait, bulk gets a turn after every `bulkTurnAfter`
/// bytes sent as interactive. With one class empty the other has the whole sender: a lone download is never
/// held back. Control frames and datagrams are ordered by the multiplexer around this scheduler.
struct StreamScheduler {
    struct Policy: Sendable {
        /// Bytes a new or quiet stream may send as interactive.
        var burst: Int
        /// How fast a stream's interactive allowance comes back.
        var refillPerSecond: Int
        /// While both classes wait, bulk gets one turn after this many bytes sent as interactive.
        var bulkTurnAfter: Int
    }

    let policy: Policy
    private var interactive = CircularBuffer<MuxStream>(initialCapacity: 16)
    private var bulk = CircularBuffer<MuxStream>(initialCapacity: 16)
    /// Bytes sent as interactive since bulk last had a turn, counted only while bulk streams wait.
    private var interactiveSinceBulkTurn = 0

    init(policy: Policy) {
        self.policy = policy
    }

    var isEmpty: Bool { self.interactive.isEmpty && self.bulk.isEmpty }

    /// Streams waiting in each class.
    var interactiveCount: Int { self.interactive.count }
    var bulkCount: Int { self.bulk.count }

    /// Gives a new stream its full allowance.
    func admit(_ stream: MuxStream, now: NIODeadline) {
        stream.interactiveAllowance = self.policy.burst
        stream.allowanceUpdated = now
    }

    /// Queues `stream` at the back of its class, as its allowance at `now` decides.
    mutating func append(_ stream: MuxStream, now: NIODeadline) {
        self.refill(stream, now: now)
        stream.bulkClass = stream.interactiveAllowance <= 0
        if stream.bulkClass {
            self.bulk.append(stream)
        } else {
            self.interactive.append(stream)
        }
    }

    /// Puts back the stream just taken, at the front of its class (it keeps its place).
    mutating func putBack(_ stream: MuxStream) {
        if stream.bulkClass {
            self.bulk.prepend(stream)
        } else {
            self.interactive.prepend(stream)
        }
    }

    /// The stream whose turn it is.
    mutating func next() -> MuxStream? {
        if let bulk = self.bulk.first,
            self.interactive.isEmpty || self.interactiveSinceBulkTurn >= self.policy.bulkTurnAfter
        {
            self.interactiveSinceBulkTurn = 0
            self.bulk.removeFirst()
            return bulk
        }
        return self.interactive.popFirst()
    }

    /// `stream`, taken by `next`, sent `count` bytes in its turn.
    mutating func sent(_ count: Int, by stream: MuxStream) {
        // Bulk turns spend too (down to one burst of debt): a download stays bulk while it keeps sending
        // faster than the refill, and only a quiet spell makes it interactive again.
        stream.interactiveAllowance = max(stream.interactiveAllowance - count, -self.policy.burst)
        if !stream.bulkClass && !self.bulk.isEmpty { self.interactiveSinceBulkTurn += count }
    }

    private func refill(_ stream: MuxStream, now: NIODeadline) {
        let elapsed = now.uptimeNanoseconds &- stream.allowanceUpdated.uptimeNanoseconds
        guard elapsed > 0, elapsed < UInt64(Int64.max), stream.interactiveAllowance < self.policy.burst else {
            stream.allowanceUpdated = max(stream.allowanceUpdated, now)
            return
        }
        // At most 10 s counts (integer math on microseconds cannot overflow then); time that refilled less
        // than a byte is not used up, so frequent calls still refill.
        let refill = Int(min(elapsed, 10_000_000_000) / 1000) * self.policy.refillPerSecond / 1_000_000
        guard refill > 0 else { return }
        stream.interactiveAllowance = min(self.policy.burst, stream.interactiveAllowance + refill)
        stream.allowanceUpdated = now
    }
}
