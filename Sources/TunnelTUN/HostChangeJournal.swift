#if canImport(Glibc)
import Glibc
#endif

/// Every change made to the host's network configuration, as the action that undoes it, kept in a state
/// file as it happens. A clean exit undoes them in reverse order; after a crash (or kill -9) the next start
/// finds the file and undoes them then.
///
/// Not thread-safe: use it from one thread at a time (setup and teardown; a shared one sits behind a lock).
public final class HostChangeJournal: @unchecked Sendable {
    /// One undo action.
    public enum Undo: Hashable, Sendable {
        /// Run a command (failures ignored: the thing may be gone already).
        case command([String])
        /// Put a file's previous contents back, in place (so a bind-mounted file keeps working) — but only
        /// if it still holds what we wrote: if something else rewrote it since, that version stays.
        case restoreFile(path: String, original: [UInt8], written: [UInt8])
        /// Turn a path back into the symbolic link it was (we replaced it with a file holding `written`).
        case restoreSymlink(path: String, target: String, written: [UInt8])
        /// Remove a file we created (if it still holds what we wrote).
        case removeFile(path: String, written: [UInt8])
    }

    /// The state file; nil keeps the journal in memory only.
    public let path: String?
    public private(set) var undos: [Undo] = []

    /// A journal that writes its state to `path` (its directory is created, mode 0700), or keeps it in
    /// memory only.
    public init(path: String?) {
        self.path = path
    }

    /// The state file for this network namespace: namespaces share /run, so its inode names the file.
    public static func defaultPath(program: String) -> String {
        "/run/\(program)/netns-\(Self.networkNamespaceID()).state"
    }

    /// The inode of this process's network namespace (0 when unknown).
    public static func networkNamespaceID() -> UInt64 {
        var info = stat()
        guard stat("/proc/self/ns/net", &info) == 0 else { return 0 }
        return UInt64(info.st_ino)
    }

    /// Records how to undo a change that was just made, and saves the journal.
    public func record(_ undo: Undo) {
        self.undos.append(undo)
        self.save()
    }

    /// Undoes everything recorded, newest first, and removes the state file. Returns one line per undo that
    /// did not work (for a warning).
    @discardableResult
    public func rollback() -> [String] {
        var problems: [String] = []
        while let undo = self.undos.popLast() {
            if let problem = Self.perform(undo) { problems.append(problem) }
        }
        if let path = self.path { unlink(path) }
        return problems
    }

    /// Undoes what a previous run left in `path` (it crashed or was killed). Returns how many changes were
    /// undone, and the problems met.
    public static func recover(path: String) -> (undone: Int, problems: [String]) {
        guard let text = readFile(path) else { return (0, []) }
        let journal = HostChangeJournal(path: path)
        guard let undos = Self.decode(String(decoding: text, as: UTF8.self)) else {
            unlink(path)
            return (0, ["\(path) is not a state file of this program; removed it"])
        }
        journal.undos = undos
        let count = undos.count
        return (count, journal.rollback())
    }

    private func save() {
        guard let path = self.path else { return }
        let directory = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !directory.isEmpty { mkdir(directory, 0o700) }
        let temporary = path + ".tmp"
        guard Self.writeFile(temporary, Array(Self.encode(self.undos).utf8), mode: 0o600, create: true) else { return }
        rename(temporary, path)
    }

    // MARK: - Undo actions

    private static func perform(_ undo: Undo) -> String? {
        switch undo {
        case .command(let arguments):
            let result = SystemCommand.run(arguments)
            // "No such process/file" means the thing is gone already, which is what we wanted.
            if result.succeeded || result.output.contains("No such") || result.output.contains("does not exist")
                || result.output.contains("Cannot find device")
            {
                return nil
            }
            return "`\(arguments.joined(separator: " "))`: \(result.output)"
        case .restoreFile(let path, let original, let written):
            guard readFile(path) == written else { return nil }
            return writeFile(path, original, mode: 0o644, create: false) ? nil : "cannot restore \(path): \(String(cString: strerror(errno)))"
        case .restoreSymlink(let path, let target, let written):
            guard readFile(path) == written else { return nil }
            unlink(path)
            return symlink(target, path) == 0 ? nil : "cannot restore the link \(path) -> \(target): \(String(cString: strerror(errno)))"
        case .removeFile(let path, let written):
            guard readFile(path) == written else { return nil }
            unlink(path)
            return nil
        }
    }

    // MARK: - State file format (one undo per line, fields hex-encoded)

    static let header = "tunnel-state 1"

    static func encode(_ undos: [Undo]) -> String {
        var lines = [Self.header]
        for undo in undos {
            switch undo {
            case .command(let arguments):
                lines.append((["cmd"] + arguments.map { hex(Array($0.utf8)) }).joined(separator: " "))
            case .restoreFile(let path, let original, let written):
                lines.append("file \(hex(Array(path.utf8))) \(hex(original)) \(hex(written))")
            case .restoreSymlink(let path, let target, let written):
                lines.append("link \(hex(Array(path.utf8))) \(hex(Array(target.utf8))) \(hex(written))")
            case .removeFile(let path, let written):
                lines.append("rm \(hex(Array(path.utf8))) \(hex(written))")
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    static func decode(_ text: String) -> [Undo]? {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: true)
        guard lines.first == Substring(Self.header) else { return nil }
        lines.removeFirst()
        var undos: [Undo] = []
        for line in lines {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            func bytes(_ i: Int) -> [UInt8]? { i < fields.count ? unhex(fields[i]) : nil }
            func text(_ i: Int) -> String? { bytes(i).map { String(decoding: $0, as: UTF8.self) } }
            switch fields.first {
            case "cmd":
                var arguments: [String] = []
                for i in 1..<fields.count {
                    guard let argument = text(i) else { return nil }
                    arguments.append(argument)
                }
                guard !arguments.isEmpty else { return nil }
                undos.append(.command(arguments))
            case "file":
                guard fields.count == 4, let path = text(1), let original = bytes(2), let written = bytes(3) else { return nil }
                undos.append(.restoreFile(path: path, original: original, written: written))
            case "link":
                guard fields.count == 4, let path = text(1), let target = text(2), let written = bytes(3) else { return nil }
                undos.append(.restoreSymlink(path: path, target: target, written: written))
            case "rm":
                guard fields.count == 3, let path = text(1), let written = bytes(2) else { return nil }
                undos.append(.removeFile(path: path, written: written))
            default:
                return nil
            }
        }
        return undos
    }

    private static let digits = Array("0123456789abcdef".utf8)

    static func hex(_ bytes: [UInt8]) -> String {
        guard !bytes.isEmpty else { return "-" }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func unhex(_ text: Substring) -> [UInt8]? {
        if text == "-" { return [] }
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            default: nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let high = value(chars[i]), let low = value(chars[i + 1]) else { return nil }
            out.append(high << 4 | low)
            i += 2
        }
        return out
    }

    // MARK: - Files

    /// A file's contents, or nil when it cannot be read.
    public static func readFile(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { return nil }
            if n == 0 { return out }
            out += chunk[0..<n]
            if out.count > 1 << 20 { return nil }
        }
    }

    /// Writes a whole file in place (truncating it), or creates it when `create` is set.
    @discardableResult
    public static func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t, create: Bool) -> Bool {
        let flags = O_WRONLY | O_TRUNC | O_CLOEXEC | (create ? O_CREAT : 0)
        let fd = open(path, flags, mode)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            offset += n
        }
        return true
    }
}
