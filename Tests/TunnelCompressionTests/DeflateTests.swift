import NIOCore
import Testing
import TunnelTestSupport

@testable import TunnelCompression

struct DeflateTests {
    @Test func framesInflateOneByOneAndShrinkText() throws {
        let deflater = try #require(Deflater())
        let inflater = try #require(Inflater())
        var total = 0
        for n in 0..<20 {
            let input = TestData.compressibleText(16 << 10)
            var compressed = ByteBuffer()
            let written = deflater.compress(input, into: &compressed)
            #expect(written == compressed.readableBytes)
            total += written
            let output = try inflater.inflate(compressed, limit: 16 << 10, allocator: ByteBufferAllocator())
            #expect(output == input, "frame \(n)")
        }
        #expect(total < 20 * (16 << 10) / 4)
    }

    @Test func randomDataGrowsOnlyByAFewBytes() throws {
        let deflater = try #require(Deflater())
        var random = ByteBuffer()
        random.writeBytes((0..<(16 << 10)).map { _ in UInt8.random(in: 0...255) })
        var compressed = ByteBuffer()
        let written = deflater.compress(random, into: &compressed)
        #expect(written <= random.readableBytes + random.readableBytes / 200)  // stored blocks: < 0.5% overhead
        let inflater = try #require(Inflater())
        #expect(try inflater.inflate(compressed, limit: 16 << 10, allocator: ByteBufferAllocator()) == random)
    }

    @Test func aBombIsRefused() throws {
        let deflater = try #require(Deflater())
        var zeros = ByteBuffer()
        zeros.writeRepeatingByte(0, count: 1 << 20)
        var compressed = ByteBuffer()
        _ = deflater.compress(zeros, into: &compressed)
        #expect(compressed.readableBytes < 8000)  // a small frame that would inflate to 1 MiB
        let inflater = try #require(Inflater())
        #expect(throws: Inflater.InflateError.tooLarge) {
            _ = try inflater.inflate(compressed, limit: 16 << 10, allocator: ByteBufferAllocator())
        }
    }

    @Test func garbageIsCorrupt() throws {
        let inflater = try #require(Inflater())
        #expect(throws: Inflater.InflateError.self) {
            _ = try inflater.inflate(
                ByteBuffer(bytes: [0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x12]),
                limit: 16 << 10,
                allocator: ByteBufferAllocator()
            )
        }
    }

    @Test func aFreshDeflaterContinuesAnExistingInflater() throws {
        // After a sync flush, a new raw deflate context's blocks are valid continuation for the inflater.
        let inflater = try #require(Inflater())
        for round in 0..<3 {
            let deflater = try #require(Deflater())
            var compressed = ByteBuffer()
            _ = deflater.compress(TestData.compressibleText(5000), into: &compressed)
            #expect(
                try inflater.inflate(compressed, limit: 16 << 10, allocator: ByteBufferAllocator())
                    == TestData.compressibleText(5000),
                "round \(round)"
            )
        }
    }

    @Test func incompressibleHints() {
        #expect(CompressibilityHint.looksIncompressible(ByteBuffer(bytes: [0x16, 0x03, 0x01, 0x02, 0x00])))
        #expect(CompressibilityHint.looksIncompressible(ByteBuffer(string: "SSH-2.0-OpenSSH_9.2\r\n")))
        #expect(!CompressibilityHint.looksIncompressible(ByteBuffer(string: "GET / HTTP/1.1\r\n")))
    }
}
