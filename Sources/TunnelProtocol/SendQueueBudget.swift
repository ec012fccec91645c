import NIOCore

/// How many bytes may wait below the multiplexer on the way out: in the kernel's send queue (unsent bytes,
/// `TCP_NOTSENT_LOWAT`) and in the channel's buffer. Whatever waits there is out of the scheduler's hands: a
/// small reply queued behind it waits as long as the link takes to send it. So the limit is what the
/// connection sends in `targetDelay` at its current rate (TCP's pacing rate: the congestion control's own
/// estimate, which unlike the delivery rate does not collapse while the tunnel is idle), within
/// `minimum...maximum`: 10 kB on a 20 Mbit/s link, 8 KiB (13 ms) at 5 Mbit/s, more on a fast one, where a
/// small queue would starve the socket. The order of what is sent is then decided at the last moment, as HTTP/2 servers
/// do for prioritization.
///
/// Pure: the connection reads the pacing rate from `TCP_INFO` when `needsMeasurement(now:)` says so, and
/// applies `limit` to the socket when `measured` reports a change.
public struct SendQueueBudget: Sendable {
    public struct Configuration: Sendable, Hashable {
        /// The queue below the scheduler holds what the connection sends in this time.
        public var targetDelay: TimeAmount = .milliseconds(4)
        public var minimum = 8 << 10
        public var maximum = 2 << 20
        /// How often the rate is read again while output flows.
        public var measureInterval: TimeAmount = .milliseconds(100)
        public init() {}
    }

    public let configuration: Configuration
    /// The current limit, in bytes.
    public private(set) var limit: Int
    private var measuredAt: NIODeadline?
    /// The last pacing rate read, bytes per second (0: unknown).
    public private(set) var pacingRate: UInt64 = 0
    /// What the kernel held unsent at the last check, and what was written since.
    private var notSentAtCheck = 0
    private var writtenSinceCheck = 0

    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
        // Until the first measurement: a queue that suits a broadband link without starving a fast one.
        self.limit = min(max(128 << 10, configuration.minimum), configuration.maximum)
    }

    /// Whether the rate should be read again at `now`.
    public func needsMeasurement(now: NIODeadline) -> Bool {
        guard let measuredAt else { return true }
        return now - measuredAt >= self.configuration.measureInterval
    }

    /// The connection's pacing rate (bytes per second; 0 when unknown) read at `now`. Returns the new limit
    /// when it moved far enough to be worth a system call (by a quarter or more), else nil.
    public mutating func measured(pacingRate: UInt64, now: NIODeadline) -> Int? {
        self.measuredAt = now
        guard pacingRate > 0 else { return nil }
        self.pacingRate = pacingRate
        let seconds = Double(self.configuration.targetDelay.nanoseconds) / 1e9
        let wanted = Double(pacingRate) * seconds
        let clamped = Int(min(max(wanted, Double(self.configuration.minimum)), Double(self.configuration.maximum)))
        guard clamped * 4 >= self.limit * 5 || clamped * 4 <= self.limit * 3 else { return nil }
        self.limit = clamped
        return clamped
    }

    /// Channel watermarks for the limit: writable again once half of it has gone.
    public var waterMarks: (low: Int, high: Int) { (self.limit / 2, self.limit) }

    /// Whether the kernel's queue is checked before each write. The kernel itself stops taking writes at
    /// `TCP_NOTSENT_LOWAT` only when a write needs a new buffer, and its last buffer may take up to 64 KiB
    /// more: far more than the limit on a slow link, where each write is therefore sized to what is left.
    /// On a fast link (a limit of 256 KiB and more) that slack does not matter and the check is skipped.
    public var checksKernelQueue: Bool { self.limit < 256 << 10 }

    /// Whether to read the kernel's queue before writing about `bytes` more: only when it may then hold half
    /// the limit or more. Small writes on a quiet connection (a ping, a keystroke) need no system call; a
    /// run of them is checked once half the limit has gone out since the last look.
    public func needsKernelCheck(beforeWriting bytes: Int) -> Bool {
        self.checksKernelQueue && self.notSentAtCheck + self.writtenSinceCheck + bytes >= self.limit / 2
    }

    /// `bytes` were handed to the socket.
    public mutating func wrote(_ bytes: Int) {
        self.writtenSinceCheck += bytes
    }

    public enum Decision: Equatable, Sendable {
        /// Write up to this many bytes now.
        case write(Int)
        /// The kernel holds enough: look again after this long (the time it takes to send half of it).
        case wait(TimeAmount)
    }

    /// With `notSent` bytes unsent in the kernel: how much to write now, or how long to wait. Never less
    /// than a small record's worth at once, so that the queue never runs dry while a record waits.
    public mutating func decide(notSent: Int) -> Decision {
        self.notSentAtCheck = notSent
        self.writtenSinceCheck = 0
        let room = self.limit - notSent
        if room >= Self.smallestWrite { return .write(room) }
        let rate = max(self.pacingRate, 1)
        let excess = UInt64(max(notSent - self.limit / 2, Self.smallestWrite))
        let nanoseconds = excess * 1_000_000_000 / rate
        return .wait(.nanoseconds(Int64(min(max(nanoseconds, 200_000), 20_000_000))))
    }

    /// The least worth writing while the kernel is near its limit.
    static let smallestWrite = 4 << 10
}
