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
    /// Plaintexts of records `acknowledged + 1 ..< nextSequence`, oldest first, back to back in a ring: keeping
    /// a record costs a copy into it, not an allocation. Its bytes are used from index 0 to its capacity
    /// (`ring.writerIndex` stays there); `head` is the oldest held byte, and a record may wrap around the end.
    private var ring = ByteBuffer()
    private var head = 0
    /// Each held record's length, oldest first.
    private var lengths = CircularBuffer<Int>(initialCapacity: 64)
    /// Bytes held.
    public private(set) var bytes = 0

    /// The ring's first size, and the most it keeps once everything is acknowledged (a burst's larger ring
    /// is given back then).
    static let smallRing = 64 << 10

    public init() {}

    /// Records held (sent and not acknowledged).
    public var count: Int { self.lengths.count }

    /// Keeps a copy of the plaintext of the record just sent (the caller's buffer is sealed in place next),
    /// and numbers it.
    public mutating func append(copying plaintext: UnsafeRawBufferPointer) {
        if self.ring.writerIndex == 0 || self.bytes + plaintext.count > self.ring.writerIndex {
            self.grow(toHold: self.bytes + plaintext.count)
        }
        let size = self.ring.writerIndex
        let tail = (self.head + self.bytes) % size
        let first = min(plaintext.count, size - tail)
        self.ring.setBytes(UnsafeRawBufferPointer(rebasing: plaintext[..<first]), at: tail)
        if first < plaintext.count { self.ring.setBytes(UnsafeRawBufferPointer(rebasing: plaintext[first...]), at: 0) }
        self.bytes += plaintext.count
        self.lengths.append(plaintext.count)
        self.nextSequence += 1
    }

    /// A larger ring (at least twice the size), the held bytes moved to its front in order.
    private mutating func grow(toHold needed: Int) {
        var larger = ByteBufferAllocator().buffer(capacity: max(Self.smallRing, needed, self.ring.writerIndex * 2))
        larger.moveWriterIndex(to: larger.capacity)
        self.copyHeld(from: self.head, count: self.bytes, into: &larger, at: 0)
        self.ring = larger
        self.head = 0
    }

    /// Copies `count` ring bytes starting at `start` (wrapping) to `target` at `offset`.
    private func copyHeld(from start: Int, count: Int, into target: inout ByteBuffer, at offset: Int) {
        guard count > 0 else { return }
        let size = self.ring.writerIndex
        let first = min(count, size - start)
        self.ring.withUnsafeReadableBytes { raw in
            target.setBytes(UnsafeRawBufferPointer(rebasing: raw[start..<(start + first)]), at: offset)
            if first < count {
                target.setBytes(UnsafeRawBufferPointer(rebasing: raw[0..<(count - first)]), at: offset + first)
            }
        }
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
            let length = self.lengths.removeFirst()
            self.head = (self.head + length) % self.ring.writerIndex
            self.bytes -= length
            self.acknowledged += 1
        }
        if self.bytes == 0 {
            self.head = 0
            if self.ring.writerIndex > Self.smallRing { self.ring = ByteBuffer() }
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
        let size = self.ring.writerIndex
        let skipped = Int(count - self.acknowledged)
        var start = self.head
        var records: [ByteBuffer] = []
        records.reserveCapacity(self.lengths.count - skipped)
        for (index, length) in self.lengths.enumerated() {
            if index >= skipped {
                if start + length <= size {
                    records.append(self.ring.getSlice(at: start, length: length)!)
                } else {
                    var record = ByteBufferAllocator().buffer(capacity: length)
                    record.moveWriterIndex(to: length)
                    self.copyHeld(from: start, count: length, into: &record, at: 0)
                    records.append(record)
                }
            }
            start = (start + length) % size
        }
        return records
    }
}
