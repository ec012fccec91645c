import NIOCore
import TunnelCrypto

/// When a sending direction rekeys (docs/PROTOCOL.md §2.4): whichever budget runs out first.
public struct RekeyPolicy: Hashable, Sendable {
    public var maxBytes: UInt64
    public var maxRecords: UInt64
    public var maxInterval: TimeAmount

    public init(maxBytes: UInt64 = 1 << 30, maxRecords: UInt64 = 1 << 20, maxInterval: TimeAmount = .minutes(10)) {
        self.maxBytes = maxBytes
        self.maxRecords = maxRecords
        self.maxInterval = maxInterval
    }
}

/// The sending half of the record layer: seals `u16 length ‖ Noise transport message` records in place.
///
/// A record is built directly in an outgoing buffer: `beginRecord` reserves the length, the caller appends
/// frames, and `sealRecord` encrypts them where they are and appends the tag, so payload bytes are copied once
/// (into the record) and never again.
public struct RecordSealer {
    private var cipher: CipherState
    private let policy: RekeyPolicy
    private var bytesSinceRekey: UInt64 = 0
    private var recordsSinceRekey: UInt64 = 0
    private var lastRekey: NIODeadline
    /// How many times this direction has rekeyed.
    public private(set) var rekeyCount = 0

    public init(cipher: CipherState, policy: RekeyPolicy, now: NIODeadline) {
        self.cipher = cipher
        self.policy = policy
        self.lastRekey = now
    }

    /// Whether the next record should carry REKEY (and be followed by `rekey()`).
    public func needsRekey(now: NIODeadline) -> Bool {
        self.bytesSinceRekey >= self.policy.maxBytes || self.recordsSinceRekey >= self.policy.maxRecords
            || now - self.lastRekey >= self.policy.maxInterval
    }

    /// Reserves the record header; returns the record's start index for `sealRecord`.
    @inlinable
    public func beginRecord(in buffer: inout ByteBuffer) -> Int {
        let start = buffer.writerIndex
        buffer.writeInteger(UInt16(0))
        return start
    }

    /// Encrypts the plaintext written since `beginRecord` in place, appends the tag and fills in the length.
    /// Throws when the nonce space is spent (the connection must end).
    public mutating func sealRecord(in buffer: inout ByteBuffer, start: Int) throws(ProtocolError) {
        let plaintextStart = start + 2
        let count = buffer.writerIndex - plaintextStart
        precondition(count >= 0 && count <= WireLimits.maxRecordPlaintext)
        guard !self.cipher.isExhausted else { throw ProtocolError.nonceExhausted() }
        buffer.writeRepeatingByte(0, count: NoiseCipher.tagLength)
        buffer.setInteger(UInt16(count + NoiseCipher.tagLength), at: start)
        let offset = plaintextStart - buffer.readerIndex
        buffer.withUnsafeMutableReadableBytes { raw in
            let base = raw.baseAddress! + offset
            self.cipher.sealInPlace(base, count: count)
        }
        self.bytesSinceRekey &+= UInt64(count)
        self.recordsSinceRekey &+= 1
    }

    /// Noise `Rekey()` on this direction; call right after sealing the record that carried REKEY.
    public mutating func rekey(now: NIODeadline) {
        self.cipher.rekey()
        self.bytesSinceRekey = 0
        self.recordsSinceRekey = 0
        self.lastRekey = now
        self.rekeyCount += 1
    }
}

/// The receiving half: splits the byte stream into records and opens them.
public struct RecordOpener {
    private var cipher: CipherState
    /// How many times this direction has rekeyed.
    public private(set) var rekeyCount = 0

    public init(cipher: CipherState) {
        self.cipher = cipher
    }

    /// Opens one record whose ciphertext (tag included) is `ciphertext`, decrypting into a new buffer.
    /// Any authentication failure is fatal for the connection.
    public mutating func open(
        _ ciphertext: UnsafeRawBufferPointer,
        allocator: ByteBufferAllocator
    ) throws(ProtocolError) -> ByteBuffer {
        var output = allocator.buffer(capacity: max(ciphertext.count - NoiseCipher.tagLength, 1))
        try self.open(ciphertext, appendingTo: &output)
        return output
    }

    /// Opens one record, appending its plaintext to `output` (which grows if it must). Lets the caller reuse
    /// one buffer for record after record.
    public mutating func open(
        _ ciphertext: UnsafeRawBufferPointer,
        appendingTo output: inout ByteBuffer
    ) throws(ProtocolError) {
        let plaintextCount = ciphertext.count - NoiseCipher.tagLength
        guard plaintextCount >= 0 else { throw ProtocolError.malformedRecord("record shorter than its tag") }
        var ok = false
        output.writeWithUnsafeMutableBytes(minimumWritableBytes: max(plaintextCount, 1)) { out in
            ok = self.cipher.open(ciphertext.baseAddress!, count: ciphertext.count, into: out.baseAddress!)
            return ok ? plaintextCount : 0
        }
        guard ok else { throw ProtocolError.decryptionFailed() }
    }

    /// Noise `Rekey()` on this direction; call after processing a record that carried REKEY.
    public mutating func rekey() {
        self.cipher.rekey()
        self.rekeyCount += 1
    }
}

/// Splits `u16 BE length ‖ body` messages out of a TCP byte stream (handshake messages and records alike).
public enum RecordFraming {
    /// The length of the next message if its 2-byte prefix has arrived, validated against the record bounds.
    /// `nil` means "need more bytes".
    @inlinable
    public static func nextLength(in buffer: ByteBuffer) throws(ProtocolError) -> Int? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self) else { return nil }
        guard Int(length) >= WireLimits.minRecordCiphertext else {
            throw ProtocolError.malformedRecord("record length \(length) below 16")
        }
        return Int(length)
    }
}
