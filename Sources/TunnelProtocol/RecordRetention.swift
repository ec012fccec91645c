import NIOCore

/// The records a side sent in a resumable session and the peer has not acknowledged yet (docs/PROTOCOL.md
/// §7.1): each record's plaintext, numbered from 1 for the whole session, kept until a RECEIVED frame covers
/// it, so that after a broken connection exactly the records the peer never processed can be sent again.
/// Pure bookkeeping; `TunnelSession` feeds it.
public struct RecordRetention {
    /// The number the next record gets.
    public private(set) var nextSequence: UInt64 = 1
    /// The peer's last acknowledgement: it processed records 1 ... `acknowledged`.
    public private(set) var acknowledged: UInt64 = 0
    /// Plaintexts of records `acknowledged + 1 ..< nextSequence`, oldest first.
    private var records = CircularBuffer<ByteBuffer>(initialCapacity: 64)
    /// Bytes held.
    public private(set) var bytes = 0

    public init() {}

    /// Records held (sent and not acknowledged).
    public var count: Int { self.records.count }

    /// Keeps a copy of the plaintext of the record just sent (the caller's buffer is sealed in place next),
    /// and numbers it.
    public mutating func append(copying plaintext: UnsafeRawBufferPointer) {
        var copy = ByteBufferAllocator().buffer(capacity: plaintext.count)
        copy.writeBytes(plaintext)
        self.records.append(copy)
        self.bytes += plaintext.count
        self.nextSequence += 1
    }

    /// The peer processed records 1 ... `count`: they are dropped. An older acknowledgement is ignored; one
    /// of a record never sent is the peer's error.
    public mutating func acknowledge(through count: UInt64) throws(ProtocolError) {
        guard count < self.nextSequence else {
            throw ProtocolError.malformedFrame(
                "RECEIVED acknowledges record \(count), but only \(self.nextSequence - 1) were sent"
            )
        }
        while self.acknowledged < count {
            let record = self.records.removeFirst()
            self.bytes -= record.readableBytes
            self.acknowledged += 1
        }
    }

    /// The records after the peer's `count` (what it has not processed), in order, for sending again on a
    /// new connection; they stay held until acknowledged there. Throws when the peer claims records never
    /// sent, or ones already dropped as acknowledged (it cannot have lost what it acknowledged).
    public func records(after count: UInt64) throws(ProtocolError) -> [ByteBuffer] {
        guard count < self.nextSequence else {
            throw ProtocolError.malformedFrame(
                "the peer claims record \(count), but only \(self.nextSequence - 1) were sent"
            )
        }
        guard count >= self.acknowledged else {
            throw ProtocolError.malformedFrame(
                "the peer claims only record \(count), but acknowledged \(self.acknowledged) before"
            )
        }
        return Array(self.records.dropFirst(Int(count - self.acknowledged)))
    }
}
