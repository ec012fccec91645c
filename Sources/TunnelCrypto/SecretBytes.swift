import CSodium

/// Fixed-size secret storage that is wiped with `sodium_memzero` when the last reference goes away.
///
/// Secrets never live in Swift arrays (which copy silently); they live here, and are only ever exposed
/// through scoped pointer access.
public final class SecretBytes: @unchecked Sendable {
    /// Number of secret bytes.
    public let count: Int
    private let storage: UnsafeMutableRawPointer

    /// Allocates `count` zero bytes, aligned to 16 (enough for libsodium's AES-GCM state).
    public init(count: Int) {
        Sodium.ensureInitialized()
        self.count = count
        self.storage = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 16)
        self.storage.initializeMemory(as: UInt8.self, repeating: 0, count: max(count, 1))
    }

    /// Copies `bytes` into new secret storage. The caller remains responsible for wiping its own copy.
    public convenience init(copying bytes: UnsafeRawBufferPointer) {
        self.init(count: bytes.count)
        if let base = bytes.baseAddress, bytes.count > 0 {
            self.storage.copyMemory(from: base, byteCount: bytes.count)
        }
    }

    /// A new buffer of `count` bytes from the system CSPRNG.
    public static func random(count: Int) -> SecretBytes {
        let secret = SecretBytes(count: count)
        fillRandom(secret.storage, count: count)
        return secret
    }

    deinit {
        sodium_memzero(self.storage, self.count)
        self.storage.deallocate()
    }

    /// Scoped read access to the secret.
    @inline(__always)
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: self.storage, count: self.count))
    }

    /// Scoped write access to the secret.
    @inline(__always)
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeMutableRawBufferPointer(start: self.storage, count: self.count))
    }

    @inline(__always)
    var pointer: UnsafeMutableRawPointer { self.storage }

    /// Constant-time equality (libsodium `sodium_memcmp`).
    public func constantTimeEquals(_ other: SecretBytes) -> Bool {
        guard self.count == other.count else { return false }
        return sodium_memcmp(self.storage, other.storage, self.count) == 0
    }
}

/// Wipes a Swift byte array in place (for temporaries that had to be arrays).
@inline(__always)
func wipe(_ bytes: inout [UInt8]) {
    let count = bytes.count
    bytes.withUnsafeMutableBytes { if let base = $0.baseAddress { sodium_memzero(base, count) } }
}
