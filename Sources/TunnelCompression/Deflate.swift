import CZlib
import NIOCore

/// Raw deflate (RFC 1951, no zlib/gzip wrapper) for one stream direction, each frame ending in a sync flush so
/// the receiver can inflate it on its own (docs/PROTOCOL.md §4).
///
/// Compression is for slow links, where the ratio decides: level 7 with zlib's 32 KiB window (6.4:1 on
/// HTML/JSON here, a little better than `ssh -C`) and ~50 MB/s per core, plenty for such links. memLevel 5
/// (instead of 8) keeps a sending context near 150 KiB and a receiving one near 40 KiB; contexts exist only
/// while a stream is busy.
public final class Deflater {
    private var stream = z_stream()
    /// Frames compressed since this context was created.
    public private(set) var framesCompressed = 0

    public static let windowBits: Int32 = 15
    public static let memoryLevel: Int32 = 5
    public static let level: Int32 = 7

    public init?() {
        let rc = deflateInit2_(
            &self.stream,
            Self.level,
            Z_DEFLATED,
            -Self.windowBits,
            Self.memoryLevel,
            Z_DEFAULT_STRATEGY,
            ZLIB_VERSION,
            Int32(MemoryLayout<z_stream>.size)
        )
        guard rc == Z_OK else { return nil }
    }

    deinit {
        deflateEnd(&self.stream)
    }

    /// Most bytes `count` input bytes can become, sync flush included.
    public func bound(_ count: Int) -> Int {
        Int(deflateBound(&self.stream, uLong(count))) + 8
    }

    /// Compresses `input` and appends it to `output`, ending with a sync flush. Returns the bytes written.
    public func compress(_ input: ByteBuffer, into output: inout ByteBuffer) -> Int {
        let capacity = self.bound(input.readableBytes)
        var written = 0
        _ = input.withUnsafeReadableBytes { source in
            output.writeWithUnsafeMutableBytes(minimumWritableBytes: capacity) { destination in
                self.stream.next_in = UnsafeMutablePointer(
                    mutating: source.baseAddress?.assumingMemoryBound(to: Bytef.self)
                )
                self.stream.avail_in = uInt(source.count)
                self.stream.next_out = destination.baseAddress!.assumingMemoryBound(to: Bytef.self)
                self.stream.avail_out = uInt(capacity)
                let rc = deflate(&self.stream, Z_SYNC_FLUSH)
                precondition(rc == Z_OK || rc == Z_BUF_ERROR, "deflate failed: \(rc)")
                precondition(self.stream.avail_in == 0, "deflateBound was too small")
                written = capacity - Int(self.stream.avail_out)
                self.stream.next_in = nil
                self.stream.next_out = nil
                return written
            }
        }
        self.framesCompressed += 1
        return written
    }
}

/// The receiving side: inflates one frame at a time into a buffer of at most `limit` bytes. A frame that would
/// inflate to more is a decompression bomb (or a broken peer): `InflateError.tooLarge`.
public final class Inflater {
    public enum InflateError: Error, Equatable, Sendable {
        /// The frame inflates beyond the limit.
        case tooLarge
        /// The data is not valid deflate.
        case corrupt
    }

    private var stream = z_stream()

    public init?() {
        let rc = inflateInit2_(&self.stream, -Deflater.windowBits, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
        guard rc == Z_OK else { return nil }
    }

    deinit {
        inflateEnd(&self.stream)
    }

    /// Inflates one frame's payload; the result never exceeds `limit` bytes.
    public func inflate(
        _ input: ByteBuffer,
        limit: Int,
        allocator: ByteBufferAllocator
    ) throws(InflateError) -> ByteBuffer {
        var output = allocator.buffer(capacity: limit + 1)
        var failure: InflateError? = nil
        _ = input.withUnsafeReadableBytes { source in
            output.writeWithUnsafeMutableBytes(minimumWritableBytes: limit + 1) { destination in
                self.stream.next_in = UnsafeMutablePointer(
                    mutating: source.baseAddress?.assumingMemoryBound(to: Bytef.self)
                )
                self.stream.avail_in = uInt(source.count)
                self.stream.next_out = destination.baseAddress!.assumingMemoryBound(to: Bytef.self)
                // One spare byte: filling it means the frame holds more than `limit`.
                self.stream.avail_out = uInt(limit + 1)
                let rc = CZlib.inflate(&self.stream, Z_SYNC_FLUSH)
                let produced = limit + 1 - Int(self.stream.avail_out)
                let leftover = self.stream.avail_in
                self.stream.next_in = nil
                self.stream.next_out = nil
                if rc != Z_OK && rc != Z_BUF_ERROR && rc != Z_STREAM_END {
                    failure = .corrupt
                    return 0
                }
                if produced > limit {
                    failure = .tooLarge
                    return 0
                }
                if leftover != 0 {
                    failure = .corrupt  // input left over with output room to spare: not a complete sync-flushed frame
                    return 0
                }
                return produced
            }
        }
        if let failure { throw failure }
        return output
    }
}

/// A cheap look at the first bytes of a stream: TLS records and SSH banners never compress.
public enum CompressibilityHint {
    public static func looksIncompressible(_ firstBytes: ByteBuffer) -> Bool {
        guard let b0 = firstBytes.getInteger(at: firstBytes.readerIndex, as: UInt8.self),
            let b1 = firstBytes.getInteger(at: firstBytes.readerIndex + 1, as: UInt8.self)
        else { return false }
        if (0x14...0x17).contains(b0) && b1 == 0x03 { return true }  // TLS record: handshake, alert, data, CCS
        if let text = firstBytes.getString(at: firstBytes.readerIndex, length: min(4, firstBytes.readableBytes)),
            text == "SSH-"
        {
            return true
        }
        return false
    }
}
