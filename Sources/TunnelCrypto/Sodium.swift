import CSodium

/// The one place that initialises libsodium. Every public entry point of this module that calls into
/// libsodium goes through `Sodium.ensureInitialized()` (a cheap load after the first call).
enum Sodium {
    private static let initialized: Bool = {
        sodium_init() >= 0
    }()

    @inline(__always)
    static func ensureInitialized() {
        precondition(initialized, "libsodium failed to initialise")
    }

    /// Whether this CPU runs libsodium's AES-256-GCM (x86-64 with AES-NI and PCLMUL).
    static var isAESGCMAvailable: Bool {
        ensureInitialized()
        return crypto_aead_aes256gcm_is_available() == 1
    }
}

/// Fills `count` bytes at `pointer` from the operating system's CSPRNG (libsodium `randombytes_buf`).
@inline(__always)
func fillRandom(_ pointer: UnsafeMutableRawPointer, count: Int) {
    Sodium.ensureInitialized()
    randombytes_buf(pointer, count)
}

/// Uniformly random bytes from the system CSPRNG.
public func secureRandomBytes(count: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { fillRandom($0.baseAddress!, count: count) }
    return bytes
}

/// A uniformly random integer in 0..<upperBound from the system CSPRNG (for jitter; not secret).
public func secureRandomUniform(_ upperBound: UInt32) -> UInt32 {
    Sodium.ensureInitialized()
    return randombytes_uniform(upperBound)
}
