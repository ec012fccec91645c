import NIOCore

/// A tunnel connection's timers as data (docs/PROTOCOL.md §3.5): the handshake deadline, the keepalive PING,
/// the dead-peer timeout, and the periodic upkeep of an established connection. Nothing here schedules a task
/// or reads a clock: the connection reports what happened (`received(now:)`, `established(now:)`), calls
/// `tick(now:)` every `tickInterval`, and acts on the actions it gets back, so a test drives it with a fake
/// clock (as boringtun's `update_timers(now)`).
public struct ConnectionTimers: Sendable {
    public struct Configuration: Sendable, Hashable {
        /// The whole handshake must finish within this time.
        public var handshakeTimeout: TimeAmount
        /// A PING goes out after this long without receiving anything.
        public var keepaliveInterval: TimeAmount
        /// The connection is dead after this long without receiving anything.
        public var deadTimeout: TimeAmount

        public init(
            handshakeTimeout: TimeAmount = .seconds(10),
            keepaliveInterval: TimeAmount = .seconds(15),
            deadTimeout: TimeAmount = .seconds(45)
        ) {
            self.handshakeTimeout = handshakeTimeout
            self.keepaliveInterval = keepaliveInterval
            self.deadTimeout = deadTimeout
        }
    }

    /// What a tick asks the connection to do, in this order.
    public enum Action: Hashable, Sendable {
        /// The handshake did not finish in time: fail the connection.
        case handshakeTimedOut
        /// Nothing came for `idle`: the peer is gone; fail the connection.
        case dead(idle: TimeAmount)
        /// Nothing came for a while: send a PING (the answer proves the peer alive, and measures the RTT).
        case sendPing
        /// Periodic upkeep of an established connection (idle compression contexts, owed flushes, a rekey due
        /// by time).
        case upkeep
    }

    public let configuration: Configuration
    private var handshakeDeadline: NIODeadline
    /// When bytes last arrived (or the connection started).
    public private(set) var lastReceive: NIODeadline
    public private(set) var isEstablished = false

    public init(configuration: Configuration, now: NIODeadline) {
        self.configuration = configuration
        self.handshakeDeadline = now + configuration.handshakeTimeout
        self.lastReceive = now
    }

    /// The connection started (its socket is up): the handshake's time runs from now.
    public mutating func started(now: NIODeadline) {
        self.handshakeDeadline = now + self.configuration.handshakeTimeout
        self.lastReceive = now
    }

    /// Bytes arrived.
    public mutating func received(now: NIODeadline) {
        self.lastReceive = now
    }

    /// The handshake finished.
    public mutating func established(now: NIODeadline) {
        self.isEstablished = true
    }

    /// How often to tick: often enough to meet the handshake deadline within a second, and the keepalive and
    /// dead timeouts (tens of seconds) within a few.
    public var tickInterval: TimeAmount {
        self.isEstablished ? .seconds(5) : .seconds(1)
    }

    /// What is due at `now`. A fatal action comes alone.
    public func tick(now: NIODeadline) -> [Action] {
        guard self.isEstablished else {
            return now >= self.handshakeDeadline ? [.handshakeTimedOut] : []
        }
        let idle = now - self.lastReceive
        if idle >= self.configuration.deadTimeout { return [.dead(idle: idle)] }
        return idle >= self.configuration.keepaliveInterval ? [.sendPing, .upkeep] : [.upkeep]
    }
}
