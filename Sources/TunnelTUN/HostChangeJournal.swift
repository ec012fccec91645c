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
    /// Where the changes are being made (written into the state file).
    private let identity: HostIdentity
    /// What runs the undo commands.
    public let commands: any HostCommands

    /// A journal that writes its state to `path` (its directory is created, mode 0700), or keeps it in
    /// memory only; `commands` runs its undo commands.
    public init(path: String?, commands: any HostCommands = SystemCommand.live) {
        self.path = path
        self.commands = commands
        self.identity = path == nil ? HostIdentity(boot: "", namespaceInode: 0, namespaceCookie: 0) : .current()
    }

    /// The state file for this network namespace. It lives under /var/lib, not /run, so that what a crash
    /// left in files (the resolver) is still undone after a reboot; the namespace's inode names the file, and
    /// the file records which namespace and boot it belongs to (the kernel reuses inode numbers).
    public static func defaultPath(program: String, instance: String? = nil) -> String {
        let suffix = instance.map { "-" + Self.fileNameSafe($0) } ?? ""
        return "/var/lib/\(program)/netns-\(HostIdentity.namespaceInode())\(suffix).state"
    }

    /// `text` with anything but letters, digits, '.', '-' and '_' replaced by '-'.
    static func fileNameSafe(_ text: String) -> String {
        String(
            text.map { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_") ? $0 : "-" }
        )
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
            if let problem = self.perform(undo) { problems.append(problem) }
        }
        if let path = self.path { unlink(path) }
        return problems
    }

    /// What recovering a state file did.
    public struct Recovery: Sendable {
        /// Changes undone.
        public var undone = 0
        /// Commands not run because the file was written in another boot or network namespace (their routes
        /// and rules went with it; running them here could remove someone else's).
        public var skipped = 0
        /// Undos that did not work, one line each.
        public var problems: [String] = []
    }

    /// Undoes what a previous run left in `path` (it crashed or was killed), after checking that the file is
    /// ours: a regular file (not a link), owned by this user, writable by no one else, in a directory that
    /// only this user (or root) can write to. Otherwise throws and changes nothing: a state file others can
    /// write would let them run commands as us.
    ///
    /// Files (the resolver) are put back only if they still hold what we wrote; commands (`ip`, `nft`) run
    /// only when the file was written in this boot and this network namespace.
    public static func recover(
        path: String,
        commands: any HostCommands = SystemCommand.live
    ) throws(UnsafeStateFile) -> Recovery {
        try Self.checkDirectory(of: path)
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return Recovery() }
            let reason = errno == ELOOP ? "it is a symbolic link" : String(cString: strerror(errno))
            throw UnsafeStateFile(path: path, reason: reason)
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw UnsafeStateFile(path: path, reason: String(cString: strerror(errno))) }
        try Self.checkOwnership(info, path: path, directory: false)
        guard let text = Self.readAll(fd) else {
            throw UnsafeStateFile(path: path, reason: String(cString: strerror(errno)))
        }
        guard let state = Self.decode(String(decoding: text, as: UTF8.self)) else {
            unlink(path)
            return Recovery(problems: ["\(path) is not a state file of this program; removed it"])
        }
        var recovery = Recovery()
        let here = HostIdentity.current()
        var undos = state.undos
        if state.identity.map({ here.isSame(as: $0) }) != true {
            recovery.skipped = undos.count(where: { if case .command = $0 { true } else { false } })
            undos.removeAll { if case .command = $0 { true } else { false } }
        }
        let journal = HostChangeJournal(path: path, commands: commands)
        journal.undos = undos
        recovery.undone = undos.count
        recovery.problems = journal.rollback()
        return recovery
    }

    /// A state file (or its directory) that others could have written.
    public struct UnsafeStateFile: Error, CustomStringConvertible {
        public var path: String
        public var reason: String
        /// The system refused access (errno EACCES or EPERM): not privileged enough.
        public var permissionDenied = false
        public var description: String {
            if self.permissionDenied { return "\(self.path): \(self.reason)" }
            return
                "refusing the state file \(self.path): \(self.reason). It records commands to run as this user after a crash, so "
                + "it must be a regular file owned by uid \(geteuid()) that no one else can write, in a directory no one else can write"
        }
    }

    /// Checks (and makes, mode 0700) the directory of a state file: owned by us or root, writable by no one else.
    public static func checkDirectory(of path: String) throws(UnsafeStateFile) {
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        guard !directory.isEmpty else { return }  // the root directory
        if mkdir(directory, 0o700) != 0 && errno != EEXIST {
            let denied = errno == EACCES || errno == EPERM
            throw UnsafeStateFile(
                path: path,
                reason: "cannot make \(directory): \(String(cString: strerror(errno)))",
                permissionDenied: denied
            )
        }
        var info = stat()
        guard lstat(directory, &info) == 0 else {
            throw UnsafeStateFile(path: path, reason: "\(directory): \(String(cString: strerror(errno)))")
        }
        try Self.checkOwnership(info, path: path, directory: true)
    }

    private static func checkOwnership(_ info: stat, path: String, directory: Bool) throws(UnsafeStateFile) {
        let what = directory ? "its directory" : "it"
        let kind = info.st_mode & S_IFMT
        guard kind == (directory ? S_IFDIR : S_IFREG) else {
            throw UnsafeStateFile(path: path, reason: "\(what) is not a \(directory ? "directory" : "regular file")")
        }
        guard info.st_uid == geteuid() || (directory && info.st_uid == 0) else {
            throw UnsafeStateFile(path: path, reason: "\(what) belongs to uid \(info.st_uid)")
        }
        guard info.st_mode & 0o022 == 0 else {
            throw UnsafeStateFile(
                path: path,
                reason: "\(what) can be written by group or others (mode \(String(info.st_mode & 0o7777, radix: 8)))"
            )
        }
    }

    private func save() {
        guard let path = self.path else { return }
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? ""
        if !directory.isEmpty { mkdir(directory, 0o700) }
        // A new file of our own, never one that is there already (a link planted by someone else included).
        let temporary = path + ".tmp"
        let flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC
        var fd = open(temporary, flags, 0o600)
        if fd < 0 && errno == EEXIST {
            unlink(temporary)
            fd = open(temporary, flags, 0o600)
        }
        guard fd >= 0 else { return }
        let written = Self.writeAll(fd, Array(Self.encode(self.undos, identity: self.identity).utf8))
        // On disk before it replaces the old one: it has to outlive a power cut as much as a crash.
        let synced = written && fsync(fd) == 0
        close(fd)
        guard synced else {
            unlink(temporary)
            return
        }
        rename(temporary, path)
    }

    // MARK: - Undo actions

    private func perform(_ undo: Undo) -> String? {
        switch undo {
        case .command(let arguments):
            let result = self.commands.run(arguments)
            // "No such process/file" means the thing is gone already, which is what we wanted.
            if result.succeeded || result.output.contains("No such") || result.output.contains("does not exist")
                || result.output.contains("Cannot find device")
            {
                return nil
            }
            return "`\(arguments.joined(separator: " "))`: \(result.output)"
        case .restoreFile(let path, let original, let written):
            guard Self.readFile(path) == written else { return nil }
            return Self.writeFile(path, original, mode: 0o644, create: false)
                ? nil : "cannot restore \(path): \(String(cString: strerror(errno)))"
        case .restoreSymlink(let path, let target, let written):
            guard Self.readFile(path) == written else { return nil }
            unlink(path)
            return symlink(target, path) == 0
                ? nil : "cannot restore the link \(path) -> \(target): \(String(cString: strerror(errno)))"
        case .removeFile(let path, let written):
            guard Self.readFile(path) == written else { return nil }
            unlink(path)
            return nil
        }
    }

    // MARK: - State file format (one undo per line, fields hex-encoded)

    static let header = "tunnel-state 2"
    /// The first version, without the host line (its commands are never run).
    static let headerVersion1 = "tunnel-state 1"

    /// Only the tools we run ourselves may appear in a state file's commands.
    static let allowedTools: Set<String> = ["ip", "nft"]

    /// Only the files we change: sysctls under /proc/sys/net and a resolver file.
    static func isAllowedFile(_ path: String) -> Bool {
        guard path.hasPrefix("/"), !path.split(separator: "/").contains("..") else { return false }
        return path.hasPrefix("/proc/sys/net/") || path.hasSuffix("/resolv.conf")
    }

    static func encode(_ undos: [Undo], identity: HostIdentity) -> String {
        var lines = [Self.header, "host \(identity.boot) \(identity.namespaceInode) \(identity.namespaceCookie)"]
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

    /// A state file's contents: where it was written (nil for version 1) and its undos. Nil when it is not a
    /// state file of ours, or names a tool or a file we never touch.
    static func decode(_ text: String) -> (identity: HostIdentity?, undos: [Undo])? {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: true)
        guard let first = lines.first, first == Substring(Self.header) || first == Substring(Self.headerVersion1) else {
            return nil
        }
        lines.removeFirst()
        var identity: HostIdentity?
        if first == Substring(Self.header) {
            let fields = lines.first?.split(separator: " ", omittingEmptySubsequences: false) ?? []
            guard fields.count == 4, fields[0] == "host", let inode = UInt64(fields[2]), let cookie = UInt64(fields[3])
            else { return nil }
            identity = HostIdentity(boot: String(fields[1]), namespaceInode: inode, namespaceCookie: cookie)
            lines.removeFirst()
        }
        var undos: [Undo] = []
        for line in lines {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            func bytes(_ i: Int) -> [UInt8]? { i < fields.count ? unhex(fields[i]) : nil }
            func text(_ i: Int) -> String? { bytes(i).map { String(decoding: $0, as: UTF8.self) } }
            func file(_ i: Int) -> String? { text(i).flatMap { Self.isAllowedFile($0) ? $0 : nil } }
            switch fields.first {
            case "cmd":
                var arguments: [String] = []
                for i in 1..<fields.count {
                    guard let argument = text(i) else { return nil }
                    arguments.append(argument)
                }
                guard let tool = arguments.first, Self.allowedTools.contains(tool) else { return nil }
                undos.append(.command(arguments))
            case "file":
                guard fields.count == 4, let path = file(1), let original = bytes(2), let written = bytes(3) else {
                    return nil
                }
                undos.append(.restoreFile(path: path, original: original, written: written))
            case "link":
                guard fields.count == 4, let path = file(1), let target = text(2), let written = bytes(3) else {
                    return nil
                }
                undos.append(.restoreSymlink(path: path, target: target, written: written))
            case "rm":
                guard fields.count == 3, let path = file(1), let written = bytes(2) else { return nil }
                undos.append(.removeFile(path: path, written: written))
            default:
                return nil
            }
        }
        return (identity, undos)
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
        return Self.readAll(fd)
    }

    /// The rest of a descriptor's contents (up to 1 MiB), or nil.
    static func readAll(_ fd: Int32) -> [UInt8]? {
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
        return Self.writeAll(fd, bytes)
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
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

/// Which boot and which network namespace host changes were made in. The namespace's inode number alone is
/// not enough (the kernel reuses it as soon as a namespace is gone); its cookie is never reused in a boot.
public struct HostIdentity: Hashable, Sendable {
    /// /proc/sys/kernel/random/boot_id.
    public var boot: String
    public var namespaceInode: UInt64
    /// SO_NETNS_COOKIE (Linux 5.14+); 0 when unknown.
    public var namespaceCookie: UInt64

    public init(boot: String, namespaceInode: UInt64, namespaceCookie: UInt64) {
        self.boot = boot
        self.namespaceInode = namespaceInode
        self.namespaceCookie = namespaceCookie
    }

    /// This process's boot and network namespace.
    public static func current() -> HostIdentity {
        let boot =
            HostChangeJournal.readFile("/proc/sys/kernel/random/boot_id")
            .map { String(decoding: $0, as: UTF8.self).trimmingWhitespace() } ?? ""
        return HostIdentity(
            boot: boot.isEmpty ? "unknown" : boot,
            namespaceInode: Self.namespaceInode(),
            namespaceCookie: Self.namespaceCookie()
        )
    }

    /// The same boot and the same namespace (an unknown part never matches).
    public func isSame(as other: HostIdentity) -> Bool {
        self.boot != "unknown" && self.boot == other.boot && self.namespaceInode == other.namespaceInode
            && self.namespaceCookie != 0 && self.namespaceCookie == other.namespaceCookie
    }

    /// The inode of this process's network namespace (0 when unknown).
    public static func namespaceInode() -> UInt64 {
        var info = stat()
        guard stat("/proc/self/ns/net", &info) == 0 else { return 0 }
        return UInt64(info.st_ino)
    }

    /// The cookie of this process's network namespace, unique in a boot (0 when the kernel cannot say).
    public static func namespaceCookie() -> UInt64 {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var cookie: UInt64 = 0
        var size = socklen_t(MemoryLayout<UInt64>.size)
        let soNetnsCookie: Int32 = 71  // SO_NETNS_COOKIE
        guard getsockopt(fd, SOL_SOCKET, soNetnsCookie, &cookie, &size) == 0 else { return 0 }
        return cookie
    }
}
