/// Noise `SymmetricState` (§5.2): the chaining key `ck`, the handshake hash `h` and the current `CipherState`.
struct SymmetricState {
    let cipher: NoiseCipher
    private var chainingKey: SecretBytes
    private(set) var handshakeHash: [UInt8]
    private var cipherState = CipherState()

    /// `InitializeSymmetric(protocol_name)`: names of at most HASHLEN bytes are zero-padded, longer ones hashed.
    init(protocolName: String, cipher: NoiseCipher) {
        self.cipher = cipher
        let name = Array(protocolName.utf8)
        var h = [UInt8](repeating: 0, count: Blake2b.hashLength)
        if name.count <= Blake2b.hashLength {
            h.replaceSubrange(0..<name.count, with: name)
        } else {
            h.withUnsafeMutableBytes { out in name.withUnsafeBytes { Blake2b.hash([$0], into: out.baseAddress!) } }
        }
        self.handshakeHash = h
        self.chainingKey = h.withUnsafeBytes { SecretBytes(copying: $0) }
    }

    var hasKey: Bool { self.cipherState.hasKey }

    /// `MixKey(input_key_material)`: `ck, temp_k = HKDF(ck, ikm, 2)`; the 64-byte `temp_k` is truncated to 32.
    mutating func mixKey(_ inputKeyMaterial: SecretBytes) {
        let out1 = SecretBytes(count: Blake2b.hashLength)
        let out2 = SecretBytes(count: Blake2b.hashLength)
        self.chainingKey.withUnsafeBytes { ck in
            inputKeyMaterial.withUnsafeBytes { ikm in
                Blake2b.hkdf(chainingKey: ck, inputKeyMaterial: ikm, outputs: [out1, out2])
            }
        }
        self.chainingKey = out1
        let key = SecretBytes(count: 32)
        key.pointer.copyMemory(from: out2.pointer, byteCount: 32)
        self.cipherState = CipherState(cipher: self.cipher, key: key)
    }

    /// `MixHash(data)`: `h = HASH(h ‖ data)`.
    mutating func mixHash(_ data: [UInt8]) {
        var next = [UInt8](repeating: 0, count: Blake2b.hashLength)
        next.withUnsafeMutableBytes { out in
            self.handshakeHash.withUnsafeBytes { h in
                data.withUnsafeBytes { d in Blake2b.hash([h, d], into: out.baseAddress!) }
            }
        }
        self.handshakeHash = next
    }

    /// `EncryptAndHash(plaintext)`.
    mutating func encryptAndHash(_ plaintext: [UInt8]) -> [UInt8] {
        let ciphertext = self.cipherState.encryptWithAd(self.handshakeHash, plaintext)
        self.mixHash(ciphertext)
        return ciphertext
    }

    /// `DecryptAndHash(ciphertext)`; `nil` if authentication fails.
    mutating func decryptAndHash(_ ciphertext: [UInt8]) -> [UInt8]? {
        guard let plaintext = self.cipherState.decryptWithAd(self.handshakeHash, ciphertext) else { return nil }
        self.mixHash(ciphertext)
        return plaintext
    }

    /// `Split()`: two `CipherState`s, initiator→responder first. Temp keys truncated to 32 bytes.
    ///
    /// Also the session's resumption secret (docs/PROTOCOL.md §7.2): the third output of the same
    /// `HKDF(ck, zerolen, 3)`, truncated to 32 bytes. HKDF's outputs are chained, so the first two (the
    /// transport keys) are those of the two-output `Split()` the Noise specification defines.
    func split() -> (CipherState, CipherState, resumptionSecret: SecretBytes) {
        let out1 = SecretBytes(count: Blake2b.hashLength)
        let out2 = SecretBytes(count: Blake2b.hashLength)
        let out3 = SecretBytes(count: Blake2b.hashLength)
        self.chainingKey.withUnsafeBytes { ck in
            Blake2b.hkdf(
                chainingKey: ck,
                inputKeyMaterial: UnsafeRawBufferPointer(start: nil, count: 0),
                outputs: [out1, out2, out3]
            )
        }
        let k1 = SecretBytes(count: 32)
        let k2 = SecretBytes(count: 32)
        let resumption = SecretBytes(count: 32)
        k1.pointer.copyMemory(from: out1.pointer, byteCount: 32)
        k2.pointer.copyMemory(from: out2.pointer, byteCount: 32)
        resumption.pointer.copyMemory(from: out3.pointer, byteCount: 32)
        return (CipherState(cipher: self.cipher, key: k1), CipherState(cipher: self.cipher, key: k2), resumption)
    }
}
