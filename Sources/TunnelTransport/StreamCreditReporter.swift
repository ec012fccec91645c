import NIOCore

/// How much of what a stream delivered its local socket has taken, so that the stream's credit goes back
/// to the peer only for bytes written (a slow reader is never sent more than its window), for the two
/// handlers that write stream bytes to a socket (`LocalStreamHandler`, `HTTPForwardHandler`).
///
/// Bytes received from the stream are either handed to the socket as they came, or consumed otherwise (an
/// HTTP head the forwarder re-encodes). NIO's outbound buffer tells how many handed bytes still wait: the
/// rest are written. Pure arithmetic; the handler reads the buffered count and carries out the report.
struct StreamCreditReporter {
    /// Bytes received from the stream.
    private(set) var received = 0
    /// The part of them handed to the socket as they came.
    private(set) var handedToSocket = 0
    /// The part consumed without being written as such.
    private(set) var consumedOtherwise = 0
    /// What was reported consumed so far.
    private(set) var reported = 0
    /// An empty write is queued behind the buffered bytes to learn when they drain.
    var watchingDrain = false

    /// Bytes arrived from the stream (all of them are handed to the socket: `handed` too).
    mutating func receivedAndHanded(_ count: Int) {
        self.received += count
        self.handedToSocket += count
    }

    mutating func received(_ count: Int) { self.received += count }
    mutating func handed(_ count: Int) { self.handedToSocket += count }
    mutating func consumedWithoutWrite(_ count: Int) { self.consumedOtherwise += count }

    /// With `buffered` bytes still in NIO's outbound buffer: how many bytes to report consumed now (0 for
    /// none). Once the buffer is empty everything received is written, or was consumed otherwise, or waits as
    /// part of something not yet written (a head being collected).
    mutating func newlyConsumed(buffered: Int) -> Int {
        let written =
            buffered == 0
            ? self.received
            : min(self.received, max(0, self.handedToSocket - buffered) + self.consumedOtherwise)
        guard written > self.reported else { return 0 }
        defer { self.reported = written }
        return written - self.reported
    }

    /// A new stream: nothing counted yet (a drain watch under way stays: it ends on its own).
    mutating func reset() {
        let watching = self.watchingDrain
        self = StreamCreditReporter()
        self.watchingDrain = watching
    }
}
