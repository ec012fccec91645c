import CSodium

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A private key file: one line of standard base64 (32 bytes), created with mode 0600.
public enum KeyFile {
    /// Why a key file could not be written or read. `description` names the file and the problem, on one line.
    public struct Error: Swift.Error, CustomStringConvertible, Sendable {
        /// The file concerned.
        public let path: String
        /// What is wrong with it.
        public let problem: String
        public var description: String { "\(self.path): \(self.problem)" }
    }

    /// Largest file accepted (a key line is 44 bytes; comments or CRLF are not expected).
    static let maxFileSize = 4096

    /// Writes a fresh key to `path` with mode 0600 and returns its public key. Refuses to replace an existing
    /// file unless `force`.
    public static func generate(at path: String, force: Bool) throws(Error) -> PublicKey {
        let key = PrivateKey()
        try write(key, to: path, force: force)
        return key.publicKey
    }

    /// Writes `key` to `path` (mode 0600).
    public static func write(_ key: PrivateKey, to path: String, force: Bool) throws(Error) {
        // Never through a symbolic link: a link planted where the key goes must not redirect the write.
        let flags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW | (force ? O_TRUNC : O_EXCL)
        let fd = open(path, flags, 0o600)
        guard fd >= 0 else {
            let err = errno
            if err == EEXIST { throw Error(path: path, problem: "already exists (use --force to overwrite)") }
            if err == ELOOP { throw Error(path: path, problem: "is a symbolic link; give the key file's own path") }
            throw Error(path: path, problem: "cannot create: \(String(cString: strerror(err)))")
        }
        defer { close(fd) }
        // An existing file kept its old mode through O_TRUNC; a key file is never readable by others.
        guard fchmod(fd, 0o600) == 0 else {
            throw Error(path: path, problem: "cannot set mode 0600: \(String(cString: strerror(errno)))")
        }
        var line = Array(key.base64ForKeyFile().utf8) + [UInt8(ascii: "\n")]
        defer { wipe(&line) }
        let written = line.withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, $0.count) }
        guard written == line.count, fsync(fd) == 0 else {
            throw Error(path: path, problem: "cannot write: \(String(cString: strerror(errno)))")
        }
    }

    /// Reads a private key. `insecureMode` is set when the file is readable by group or others.
    public static func load(from path: String) throws(Error) -> (key: PrivateKey, insecureMode: Bool) {
        // Not through a symbolic link (its target may be anyone's), and without blocking on a FIFO.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else {
            if errno == ELOOP { throw Error(path: path, problem: "is a symbolic link; give the key file's own path") }
            throw Error(path: path, problem: "cannot open: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw Error(path: path, problem: "cannot stat: \(String(cString: strerror(errno)))")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw Error(path: path, problem: "not a regular file") }
        var buffer = [UInt8](repeating: 0, count: maxFileSize + 1)
        defer { wipe(&buffer) }
        var total = 0
        while total < buffer.count {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + total, $0.count - total) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Error(path: path, problem: "cannot read: \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            total += n
        }
        guard total <= maxFileSize else { throw Error(path: path, problem: "too large for a key file") }
        var text = Array(buffer[0..<total])
        defer { wipe(&text) }
        while let last = text.last,
            last == UInt8(ascii: "\n") || last == UInt8(ascii: "\r") || last == UInt8(ascii: " ")
        {
            text.removeLast()
        }
        guard !text.isEmpty else { throw Error(path: path, problem: "empty key file") }
        guard !text.contains(UInt8(ascii: "\n")) else {
            throw Error(path: path, problem: "expected one line of base64, found several lines")
        }
        guard var raw = Base64.decode(bytes: text) else {
            throw Error(path: path, problem: "not valid base64 (expected one 44-character base64 key)")
        }
        defer { wipe(&raw) }
        guard raw.count == PublicKey.byteCount else {
            throw Error(path: path, problem: "key is \(raw.count) bytes, expected 32")
        }
        guard let key = PrivateKey(secret: raw.withUnsafeBytes { SecretBytes(copying: $0) }) else {
            throw Error(path: path, problem: "not a valid X25519 private key")
        }
        return (key, info.st_mode & 0o077 != 0)
    }
}
