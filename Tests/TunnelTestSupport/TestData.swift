import NIOCore

/// Payloads the unit tests of several targets share, so each is written once.
public enum TestData {
    /// `count` bytes of repetitive text, as web pages and API responses are (what compression is for).
    public static func compressibleText(_ count: Int) -> ByteBuffer {
        var out = ByteBuffer()
        var i = 0
        while out.readableBytes < count {
            out.writeString("{\"id\": \(i), \"name\": \"user\(i % 97)\", \"row\": \"<td>\(i * 7 % 1000)</td>\"}\n")
            i += 1
        }
        return out.getSlice(at: 0, length: count)!
    }

    /// `count` random bytes (incompressible, as media and TLS are).
    public static func random(_ count: Int) -> ByteBuffer {
        ByteBuffer(bytes: (0..<count).map { _ in UInt8.random(in: 0...255) })
    }
}
