import CSodium

/// The AEAD of a Noise protocol name (Noise §12.3, §12.4).
public enum NoiseCipher: String, Sendable, CaseIterable, CustomStringConvertible {
    /// ChaCha20-Poly1305 (IETF); nonce = 4 zero bytes ‖ n as u64 little-endian.
    case chaChaPoly = "ChaChaPoly"
    /// AES-256-GCM; nonce = 4 zero bytes ‖ n as u64 big-endian. Only where `isAvailable`.
    case aesGCM = "AESGCM"

    /// Size of the authentication tag appended to every ciphertext.
    public static let tagLength = 16

    /// Whether libsodium can run this cipher on this CPU.
    public var isAvailable: Bool {
        switch self {
        case .chaChaPoly: return true
        case .aesGCM: return Sodium.isAESGCMAvailable
        }
    }

    public var description: String { self.rawValue }
}

/// A 32-byte AEAD key, with AES-GCM's expanded key schedule precomputed once (`beforenm`).
/// Both live in `SecretBytes` and are wiped on drop.
final class AEADKey: @unchecked Sendable {
    let cipher: NoiseCipher
    let key: SecretBytes
    private let aesState: SecretBytes?

    init(cipher: NoiseCipher, key: SecretBytes) {
        precondition(key.count == 32)
        self.cipher = cipher
        self.key = key
        switch cipher {
        case .chaChaPoly:
            self.aesState = nil
        case .aesGCM:
            precondition(cipher.isAvailable, "AES-256-GCM is not available on this CPU")
            let state = SecretBytes(count: crypto_aead_aes256gcm_statebytes())
            _ = crypto_aead_aes256gcm_beforenm(
                state.pointer.assumingMemoryBound(to: crypto_aead_aes256gcm_state.self),
                key.pointer.assumingMemoryBound(to: UInt8.self)
            )
            self.aesState = state
        }
    }

    /// Builds the 12-byte nonce for counter `n` (Noise §12.3 / §12.4) and runs `body` with it.
    @inline(__always)
    private func withNonce<R>(_ n: UInt64, _ body: (UnsafePointer<UInt8>) -> R) -> R {
        let low = UInt32(truncatingIfNeeded: n)
        let high = UInt32(truncatingIfNeeded: n >> 32)
        var nonce: (UInt32, UInt32, UInt32)
        switch self.cipher {
        case .chaChaPoly: nonce = (0, low.littleEndian, high.littleEndian)
        case .aesGCM: nonce = (0, high.bigEndian, low.bigEndian)
        }
        return withUnsafeBytes(of: &nonce) { body($0.baseAddress!.assumingMemoryBound(to: UInt8.self)) }
    }

    /// Encrypts `count` bytes from `plaintext` into `ciphertext` (may be the same memory) and writes the tag.
    @inline(__always)
    func seal(
        nonce n: UInt64,
        ad: UnsafeRawBufferPointer,
        plaintext: UnsafeRawPointer,
        count: Int,
        ciphertext: UnsafeMutableRawPointer,
        tag: UnsafeMutableRawPointer
    ) {
        let adBase = ad.baseAddress?.assumingMemoryBound(to: UInt8.self)
        withNonce(n) { nonce in
            switch self.cipher {
            case .chaChaPoly:
                _ = self.key.withUnsafeBytes { k in
                    crypto_aead_chacha20poly1305_ietf_encrypt_detached(
                        ciphertext.assumingMemoryBound(to: UInt8.self),
                        tag.assumingMemoryBound(to: UInt8.self),
                        nil,
                        plaintext.assumingMemoryBound(to: UInt8.self),
                        UInt64(count),
                        adBase,
                        UInt64(ad.count),
                        nil,
                        nonce,
                        k.baseAddress!.assumingMemoryBound(to: UInt8.self)
                    )
                }
            case .aesGCM:
                _ = crypto_aead_aes256gcm_encrypt_detached_afternm(
                    ciphertext.assumingMemoryBound(to: UInt8.self),
                    tag.assumingMemoryBound(to: UInt8.self),
                    nil,
                    plaintext.assumingMemoryBound(to: UInt8.self),
                    UInt64(count),
                    adBase,
                    UInt64(ad.count),
                    nil,
                    nonce,
                    self.aesState!.pointer.assumingMemoryBound(to: crypto_aead_aes256gcm_state.self)
                )
            }
        }
    }

    /// Verifies and decrypts `count` bytes of `ciphertext` with `tag` into `plaintext`. `false` if forged.
    @inline(__always)
    func open(
        nonce n: UInt64,
        ad: UnsafeRawBufferPointer,
        ciphertext: UnsafeRawPointer,
        count: Int,
        tag: UnsafeRawPointer,
        plaintext: UnsafeMutableRawPointer
    ) -> Bool {
        let adBase = ad.baseAddress?.assumingMemoryBound(to: UInt8.self)
        return withNonce(n) { nonce in
            switch self.cipher {
            case .chaChaPoly:
                return self.key.withUnsafeBytes { k in
                    crypto_aead_chacha20poly1305_ietf_decrypt_detached(
                        plaintext.assumingMemoryBound(to: UInt8.self),
                        nil,
                        ciphertext.assumingMemoryBound(to: UInt8.self),
                        UInt64(count),
                        tag.assumingMemoryBound(to: UInt8.self),
                        adBase,
                        UInt64(ad.count),
                        nonce,
                        k.baseAddress!.assumingMemoryBound(to: UInt8.self)
                    )
                } == 0
            case .aesGCM:
                return crypto_aead_aes256gcm_decrypt_detached_afternm(
                    plaintext.assumingMemoryBound(to: UInt8.self),
                    nil,
                    ciphertext.assumingMemoryBound(to: UInt8.self),
                    UInt64(count),
                    tag.assumingMemoryBound(to: UInt8.self),
                    adBase,
                    UInt64(ad.count),
                    nonce,
                    self.aesState!.pointer.assumingMemoryBound(to: crypto_aead_aes256gcm_state.self)
                ) == 0
            }
        }
    }
}

/// Noise `CipherState` (§5.1): a key `k` and a 64-bit counter `n`.
///
/// `n` only advances after a successful encryption or decryption; `n = 2^64-1` is reserved for `Rekey()`,
/// so a state that reaches it refuses to seal or open anything more.
public struct CipherState: Sendable {
    private var key: AEADKey?
    /// The next nonce.
    public private(set) var nonce: UInt64 = 0

    /// The AEAD this state encrypts with, or `nil` before `InitializeKey`.
    public var cipher: NoiseCipher? { self.key?.cipher }

    /// An empty state (`k = empty`): `EncryptWithAd` and `DecryptWithAd` pass data through.
    public init() {}

    init(cipher: NoiseCipher, key: SecretBytes) {
        self.key = AEADKey(cipher: cipher, key: key)
        self.nonce = 0
    }

    /// Whether a key is set.
    public var hasKey: Bool { self.key != nil }

    /// Whether the counter has reached its reserved last value.
    public var isExhausted: Bool { self.nonce == UInt64.max }

    // MARK: - Transport fast paths (no copies: callers pass pointers into their record buffers)

    /// Encrypts `count` bytes at `buffer` in place and writes the 16-byte tag right after them.
    /// The caller guarantees `count + 16` writable bytes and must check `isExhausted` first.
    @inline(__always)
    public mutating func sealInPlace(_ buffer: UnsafeMutableRawPointer, count: Int) {
        precondition(!self.isExhausted, "nonce space exhausted")
        self.key!.seal(
            nonce: self.nonce,
            ad: UnsafeRawBufferPointer(start: nil, count: 0),
            plaintext: buffer,
            count: count,
            ciphertext: buffer,
            tag: buffer + count
        )
        self.nonce &+= 1
    }

    /// Verifies and decrypts a ciphertext of `count` bytes (tag included) into `output` (`count - 16` bytes).
    /// Returns `false` and leaves the counter unchanged if authentication fails.
    @inline(__always)
    public mutating func open(_ ciphertext: UnsafeRawPointer, count: Int, into output: UnsafeMutableRawPointer) -> Bool
    {
        guard count >= NoiseCipher.tagLength, !self.isExhausted else { return false }
        let bodyCount = count - NoiseCipher.tagLength
        let ok = self.key!.open(
            nonce: self.nonce,
            ad: UnsafeRawBufferPointer(start: nil, count: 0),
            ciphertext: ciphertext,
            count: bodyCount,
            tag: ciphertext + bodyCount,
            plaintext: output
        )
        if ok { self.nonce &+= 1 }
        return ok
    }

    // MARK: - Handshake-sized helpers (Noise §5.1)

    /// `EncryptWithAd(ad, plaintext)`: ciphertext ‖ tag, or the plaintext itself while there is no key.
    mutating func encryptWithAd(_ ad: [UInt8], _ plaintext: [UInt8]) -> [UInt8] {
        guard let key = self.key else { return plaintext }
        precondition(!self.isExhausted)
        var out = [UInt8](repeating: 0, count: plaintext.count + NoiseCipher.tagLength)
        out.withUnsafeMutableBytes { o in
            plaintext.withUnsafeBytes { p in
                ad.withUnsafeBytes { a in
                    key.seal(
                        nonce: self.nonce,
                        ad: a,
                        plaintext: p.baseAddress ?? UnsafeRawPointer(o.baseAddress!),
                        count: plaintext.count,
                        ciphertext: o.baseAddress!,
                        tag: o.baseAddress! + plaintext.count
                    )
                }
            }
        }
        self.nonce &+= 1
        return out
    }

    /// `DecryptWithAd(ad, ciphertext)`: the plaintext, or `nil` if authentication fails (counter unchanged).
    mutating func decryptWithAd(_ ad: [UInt8], _ ciphertext: [UInt8]) -> [UInt8]? {
        guard let key = self.key else { return ciphertext }
        guard ciphertext.count >= NoiseCipher.tagLength, !self.isExhausted else { return nil }
        let bodyCount = ciphertext.count - NoiseCipher.tagLength
        var out = [UInt8](repeating: 0, count: max(bodyCount, 1))
        let ok = out.withUnsafeMutableBytes { o in
            ciphertext.withUnsafeBytes { c in
                ad.withUnsafeBytes { a in
                    key.open(
                        nonce: self.nonce,
                        ad: a,
                        ciphertext: c.baseAddress!,
                        count: bodyCount,
                        tag: c.baseAddress! + bodyCount,
                        plaintext: o.baseAddress!
                    )
                }
            }
        }
        guard ok else { return nil }
        self.nonce &+= 1
        out.removeLast(out.count - bodyCount)
        return out
    }

    /// Noise `Rekey()` (§4.2): `k = first 32 bytes of ENCRYPT(k, 2^64-1, "", 32 zero bytes)`. `n` is unchanged.
    public mutating func rekey() {
        guard let key = self.key else { return }
        let newKey = SecretBytes(count: 32)
        let scratch = SecretBytes(count: 32 + NoiseCipher.tagLength)
        key.seal(
            nonce: UInt64.max,
            ad: UnsafeRawBufferPointer(start: nil, count: 0),
            plaintext: scratch.pointer,
            count: 32,
            ciphertext: scratch.pointer,
            tag: scratch.pointer + 32
        )
        newKey.pointer.copyMemory(from: scratch.pointer, byteCount: 32)
        self.key = AEADKey(cipher: key.cipher, key: newKey)
    }
}
