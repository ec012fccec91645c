import CSodium

/// BLAKE2b-512 (Noise `HASH`, HASHLEN = 64, BLOCKLEN = 128) and the HMAC/HKDF built on it (Noise §4.3, RFC 2104).
///
/// libsodium's keyed `crypto_generichash` is BLAKE2b's own keyed mode, *not* HMAC, so HMAC is built here from
/// the unkeyed hash as RFC 2104 describes.
enum Blake2b {
    static let hashLength = 64
    static let blockLength = 128

    /// `HASH(parts[0] ‖ parts[1] ‖ …)` into `output` (64 bytes).
    static func hash(_ parts: [UnsafeRawBufferPointer], into output: UnsafeMutableRawPointer) {
        Sodium.ensureInitialized()
        // The state type is 64-byte aligned in C and does not import into Swift: allocate it by size.
        let size = crypto_generichash_statebytes()
        let state = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
        defer {
            sodium_memzero(state, size)
            state.deallocate()
        }
        let typed = OpaquePointer(state)
        crypto_generichash_init(typed, nil, 0, hashLength)
        for part in parts where part.count > 0 {
            crypto_generichash_update(typed, part.baseAddress!.assumingMemoryBound(to: UInt8.self), UInt64(part.count))
        }
        crypto_generichash_final(typed, output.assumingMemoryBound(to: UInt8.self), hashLength)
    }

    /// `HMAC-HASH(key, data)` into `output` (64 bytes). Keys here are at most 64 bytes (Noise chaining keys).
    static func hmac(key: UnsafeRawBufferPointer, data: [UnsafeRawBufferPointer], into output: UnsafeMutableRawPointer)
    {
        precondition(key.count <= blockLength)
        let pad = SecretBytes(count: blockLength)
        let inner = SecretBytes(count: hashLength)
        pad.withUnsafeMutableBytes { padBytes in
            for i in 0..<blockLength { padBytes[i] = (i < key.count ? key[i] : 0) ^ 0x36 }
        }
        pad.withUnsafeBytes { padBytes in hash([padBytes] + data, into: inner.pointer) }
        pad.withUnsafeMutableBytes { padBytes in
            for i in 0..<blockLength { padBytes[i] = (i < key.count ? key[i] : 0) ^ 0x5C }
        }
        pad.withUnsafeBytes { padBytes in
            inner.withUnsafeBytes { innerBytes in hash([padBytes, innerBytes], into: output) }
        }
    }

    /// Noise `HKDF(chaining_key, input_key_material, num_outputs)` for 2 or 3 outputs of 64 bytes each.
    static func hkdf(
        chainingKey: UnsafeRawBufferPointer,
        inputKeyMaterial: UnsafeRawBufferPointer,
        outputs: [SecretBytes]
    ) {
        precondition(outputs.count == 2 || outputs.count == 3)
        let tempKey = SecretBytes(count: hashLength)
        hmac(key: chainingKey, data: [inputKeyMaterial], into: tempKey.pointer)
        var previous: SecretBytes? = nil
        for (index, output) in outputs.enumerated() {
            precondition(output.count == hashLength)
            var counter = UInt8(index + 1)
            tempKey.withUnsafeBytes { tk in
                withUnsafeBytes(of: &counter) { counterBytes in
                    if let previous {
                        previous.withUnsafeBytes { prev in
                            hmac(key: tk, data: [prev, counterBytes], into: output.pointer)
                        }
                    } else {
                        hmac(key: tk, data: [counterBytes], into: output.pointer)
                    }
                }
            }
            previous = output
        }
    }
}

/// Compares two secrets (passwords, tokens) in time that depends on neither their contents nor which one is
/// longer: both are hashed with BLAKE2b-512 first, then the digests are compared with `sodium_memcmp`.
public func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    var da = [UInt8](repeating: 0, count: Blake2b.hashLength)
    var db = [UInt8](repeating: 0, count: Blake2b.hashLength)
    da.withUnsafeMutableBytes { out in a.withUnsafeBytes { Blake2b.hash([$0], into: out.baseAddress!) } }
    db.withUnsafeMutableBytes { out in b.withUnsafeBytes { Blake2b.hash([$0], into: out.baseAddress!) } }
    return da.withUnsafeBytes { x in
        db.withUnsafeBytes { y in sodium_memcmp(x.baseAddress!, y.baseAddress!, Blake2b.hashLength) == 0 }
    }
}
