import NIOCore
import TunnelRuntime

/// When the client tries to reach its server again: exponential backoff with jitter between failed attempts
/// (250 ms doubling up to the configured maximum), an early attempt when a user is waiting (at most one a
/// second), a fresh start after a success unless another machine with the same key keeps replacing this
/// client's tunnel. Pure: time and the random jitter come in, so a test drives it without waiting.
struct ReconnectPolicy {
    static let initialBackoff: TimeAmount = .milliseconds(250)
    /// Least time between two attempts made because a user is waiting.
    static let demandSpacing: TimeAmount = .seconds(1)
    /// How long a replacement by another connection of this key counts against a fresh backoff.
    static let replacementMemory: TimeAmount = .seconds(60)

    let maximum: TimeAmount
    /// The backoff of the next failure's delay (before jitter).
    private(set) var backoff = Self.initialBackoff
    private(set) var consecutiveFailures = 0
    private(set) var lastAttempt = NIODeadline.distantPast
    /// When the server replaced this client's tunnel with another connection of its key (last minute).
    private var replacements: [NIODeadline] = []

    init(maximum: TimeAmount) {
        self.maximum = max(maximum, Self.initialBackoff)
    }

    /// An attempt starts now.
    mutating func attempting(now: NIODeadline) {
        self.lastAttempt = now
    }

    /// The attempt failed: how long to wait before the next one. `jitter` is uniform in 0.5 ..< 1.0 (the
    /// delay is that share of the backoff, so clients that failed together do not come back together).
    mutating func failed(jitter: Double) -> TimeAmount {
        self.consecutiveFailures += 1
        let delay = TimeAmount.nanoseconds(Int64(Double(self.backoff.nanoseconds) * min(max(jitter, 0.5), 1.0)))
        self.backoff = min(self.backoff * 2, self.maximum)
        return delay
    }

    /// Whether this failure deserves a warning (the first, then every tenth), the rest being info lines.
    var failureIsWorthAWarning: Bool {
        self.consecutiveFailures <= 1 || self.consecutiveFailures % 10 == 0
    }

    /// The server replaced this client's tunnel with another connection of its key: returns how often that
    /// happened in the last minute (three or more: another machine uses the same key).
    mutating func replaced(now: NIODeadline) -> Int {
        self.replacements = self.replacements.filter { now - $0 < Self.replacementMemory } + [now]
        return self.replacements.count
    }

    /// A tunnel is up. The backoff starts afresh, unless the tunnel keeps being taken over: then the two
    /// machines that share a key take turns ever more slowly instead of several times a second.
    mutating func succeeded(now: NIODeadline) {
        self.consecutiveFailures = 0
        self.replacements.removeAll { now - $0 >= Self.replacementMemory }
        if self.replacements.isEmpty { self.backoff = Self.initialBackoff }
    }

    /// A user is waiting (a request, a packet) while no tunnel is up and no attempt is under way: whether to
    /// try now rather than sit out the backoff.
    func shouldTryForWaitingUser(now: NIODeadline) -> Bool {
        now - self.lastAttempt >= Self.demandSpacing
    }
}

/// Requests waiting for a tunnel: first come, first served, at most `capacity` of them, each until its
/// deadline. Pure: the caller answers what comes out.
struct WaitingQueue<Item> {
    struct Entry {
        let item: Item
        let deadline: NIODeadline
    }

    let capacity: Int
    private var entries = CircularBuffer<Entry>()

    init(capacity: Int) {
        self.capacity = capacity
    }

    var isEmpty: Bool { self.entries.isEmpty }
    var count: Int { self.entries.count }
    /// The deadline of the oldest request (when the next one expires).
    var nextDeadline: NIODeadline? { self.entries.first?.deadline }

    /// Queues `item` until `deadline`; false when the queue is full (answer it at once).
    mutating func append(_ item: Item, deadline: NIODeadline) -> Bool {
        guard self.entries.count < self.capacity else { return false }
        self.entries.append(Entry(item: item, deadline: deadline))
        return true
    }

    /// Puts back a request taken with `popFirstEntry` that could not be served yet (it keeps its deadline).
    mutating func putBack(_ item: Item, deadline: NIODeadline) {
        self.entries.prepend(Entry(item: item, deadline: deadline))
    }

    /// The oldest request with its deadline, removed.
    mutating func popFirstEntry() -> Entry? { self.entries.popFirst() }

    /// Removes the first request `matches` picks; whether there was one.
    mutating func remove(where matches: (Item) -> Bool) -> Bool {
        guard let index = self.entries.firstIndex(where: { matches($0.item) }) else { return false }
        self.entries.remove(at: index)
        return true
    }

    /// Removes and returns every request whose deadline has passed at `now`, oldest first.
    mutating func expired(now: NIODeadline) -> [Item] {
        var out: [Item] = []
        while let first = self.entries.first, first.deadline <= now {
            self.entries.removeFirst()
            out.append(first.item)
        }
        return out
    }

    /// Removes and returns every request.
    mutating func removeAll() -> [Item] {
        defer { self.entries.removeAll() }
        return self.entries.map(\.item)
    }
}

/// Which server of the client's list the next attempt goes to (README, *Several servers*). Pure.
///
/// The first server is preferred. An attempt that fails moves on to the next server at once (no backoff
/// while the list has servers not tried in this round); when every server failed, the round ends: the
/// caller backs off and the next round starts again from the first. A lost tunnel is retried on its own
/// server first (a session can be resumed only there), and a server that asked its clients to leave (GOAWAY,
/// it is draining) is passed over for the next one.
struct ServerRotation {
    let count: Int
    /// The index of the server the next attempt goes to.
    private(set) var current = 0
    /// Servers that failed in this round.
    private(set) var failedInRound = 0

    init(count: Int) {
        precondition(count >= 1)
        self.count = count
    }

    /// The attempt on `current` failed. True: try the next server now; false: every server failed in this
    /// round, back off (the next attempt goes to the first server).
    mutating func failed() -> Bool {
        self.failedInRound += 1
        if self.failedInRound < self.count {
            self.current = (self.current + 1) % self.count
            return true
        }
        self.failedInRound = 0
        self.current = 0
        return false
    }

    /// A tunnel came up on `current`.
    mutating func succeeded() {
        self.failedInRound = 0
    }

    /// The current server is going away (GOAWAY): the next attempt goes to the next server.
    mutating func moveOn() {
        self.current = (self.current + 1) % self.count
        self.failedInRound = 0
    }
}
