import CSodium

/// An X25519 public key (32 bytes). Public keys are not secret; equality is still constant time.
public struct PublicKey: Hashable, Sendable, CustomStringConvertible {
    /// Length of an X25519 key in bytes.
    public static let byteCount = 32

    /// The raw key bytes.
    public let bytes: [UInt8]

    /// Wraps 32 raw bytes; `nil` for any other length.
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == Self.byteCount else { return nil }
        self.bytes = Array(bytes)
    }

    /// Parses one standard-base64 key (as printed by `keygen`/`pubkey` and as WireGuard prints keys).
    public init?(base64: some StringProtocol) {
        guard let decoded = Base64.decode(String(base64)), let key = PublicKey(bytes: decoded) else { return nil }
        self = key
    }

    /// Standard base64 of the key, 44 characters.
    public var base64: String { Base64.encode(self.bytes) }

    /// The key in base64; public keys are safe to log.
    public var description: String { self.base64 }

    /// Constant-time comparison (libsodium `sodium_memcmp`).
    public func constantTimeEquals(_ other: PublicKey) -> Bool {
        Sodium.ensureInitialized()
        return self.bytes.withUnsafeBytes { a in
            other.bytes.withUnsafeBytes { b in sodium_memcmp(a.baseAddress!, b.baseAddress!, Self.byteCount) == 0 }
        }
    }

    public static func == (lhs: PublicKey, rhs: PublicKey) -> Bool { lhs.constantTimeEquals(rhs) }
    public func hash(into hasher: inout Hasher) { self.bytes.withUnsafeBytes { hasher.combine(bytes: $0) } }
}

/// An X25519 private key. The scalar lives in `SecretBytes` and is wiped when the key is dropped.
public final class PrivateKey: Sendable {
    let secret: SecretBytes
    /// The matching public key, `X25519(scalar, 9)`.
    public let publicKey: PublicKey

    /// A fresh key from the system CSPRNG (Noise `GENERATE_KEYPAIR`).
    public convenience init() {
        self.init(secret: SecretBytes.random(count: PublicKey.byteCount))!
    }

    /// Takes ownership of 32 secret bytes; `nil` if the length is wrong or the scalar is degenerate.
    public init?(secret: SecretBytes) {
        guard secret.count == PublicKey.byteCount else { return nil }
        Sodium.ensureInitialized()
        var pub = [UInt8](repeating: 0, count: PublicKey.byteCount)
        let rc = pub.withUnsafeMutableBytes { out in
            secret.withUnsafeBytes { sk in
                crypto_scalarmult_base(
                    out.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    sk.baseAddress!.assumingMemoryBound(to: UInt8.self)
                )
            }
        }
        guard rc == 0 else { return nil }
        self.secret = secret
        self.publicKey = PublicKey(bytes: pub)!
    }

    /// Copies 32 raw bytes into a new key (used by tests with fixed keys).
    public convenience init?(rawBytes: [UInt8]) {
        guard rawBytes.count == PublicKey.byteCount else { return nil }
        self.init(secret: rawBytes.withUnsafeBytes { SecretBytes(copying: $0) })
    }

    /// Noise `DH(self, remote)`: X25519 into `output` (32 bytes). Fails for low-order points (all-zero result).
    func diffieHellman(with remote: PublicKey, into output: SecretBytes) -> Bool {
        precondition(output.count == 32)
        return remote.bytes.withUnsafeBytes { pk in
            self.secret.withUnsafeBytes { sk in
                crypto_scalarmult(
                    output.pointer.assumingMemoryBound(to: UInt8.self),
                    sk.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    pk.baseAddress!.assumingMemoryBound(to: UInt8.self)
                ) == 0
            }
        }
    }

    /// The private key in standard base64, for writing a key file. The returned string is a copy of the
    /// secret; callers write it out and drop it at once.
    public func base64ForKeyFile() -> String {
        self.secret.withUnsafeBytes { Base64.encode($0) }
    }
}
