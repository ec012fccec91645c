import CSodium

/// Standard base64 (RFC 4648 §4) through libsodium, whose codec runs in constant time (no table lookup indexed
/// by the data), so decoding a private key leaks nothing through timing. One implementation for keys and for
/// HTTP Basic credentials.
public enum Base64 {
    private static let original: Int32 = 1  // sodium_base64_VARIANT_ORIGINAL
    private static let originalNoPadding: Int32 = 3  // sodium_base64_VARIANT_ORIGINAL_NO_PADDING

    public static func encode(_ bytes: some Collection<UInt8>) -> String {
        let input = Array(bytes)
        return input.withUnsafeBytes { Self.encode($0) }
    }

    public static func encode(_ buffer: UnsafeRawBufferPointer) -> String {
        Sodium.ensureInitialized()
        guard buffer.count > 0 else { return "" }
        // sodium_base64_ENCODED_LEN for the padded variant: 4 characters per 3 bytes, and the terminating NUL.
        let capacity = (buffer.count + 2) / 3 * 4 + 1
        var out = [CChar](repeating: 0, count: capacity)
        out.withUnsafeMutableBufferPointer { b64 in
            _ = sodium_bin2base64(
                b64.baseAddress!,
                capacity,
                buffer.baseAddress!.assumingMemoryBound(to: UInt8.self),
                buffer.count,
                Self.original
            )
        }
        defer { out.withUnsafeMutableBytes { sodium_memzero($0.baseAddress, $0.count) } }
        return String(decoding: out.prefix(capacity - 1).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Decodes padded standard base64; `nil` on any invalid character, length, padding or trailing bits.
    public static func decode(_ string: String) -> [UInt8]? {
        Self.decode(bytes: Array(string.utf8))
    }

    /// Decodes standard base64 from raw ASCII bytes (lets key files avoid `String` copies of secrets).
    /// Padding is required unless `paddingOptional` (HTTP Basic credentials, which some clients send without).
    public static func decode(bytes chars: [UInt8], paddingOptional: Bool = false) -> [UInt8]? {
        if let decoded = Self.decode(chars, variant: Self.original) { return decoded }
        guard paddingOptional, !chars.contains(UInt8(ascii: "=")) else { return nil }
        return Self.decode(chars, variant: Self.originalNoPadding)
    }

    private static func decode(_ chars: [UInt8], variant: Int32) -> [UInt8]? {
        Sodium.ensureInitialized()
        guard !chars.isEmpty else { return [] }
        var out = [UInt8](repeating: 0, count: chars.count / 4 * 3 + 3)
        var length = 0
        let ok = chars.withUnsafeBufferPointer { b64 in
            b64.withMemoryRebound(to: CChar.self) { text in
                out.withUnsafeMutableBufferPointer { bin in
                    var end: UnsafePointer<CChar>? = nil
                    let rc = sodium_base642bin(
                        bin.baseAddress!,
                        bin.count,
                        text.baseAddress!,
                        text.count,
                        nil,
                        &length,
                        &end,
                        variant
                    )
                    // Every character consumed: nothing after the encoded data.
                    return rc == 0 && end == text.baseAddress! + text.count
                }
            }
        }
        guard ok else {
            wipe(&out)
            return nil
        }
        let result = Array(out[0..<length])
        wipe(&out)
        return result
    }
}
