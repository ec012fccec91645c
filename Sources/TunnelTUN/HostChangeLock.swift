#if canImport(Glibc)
import Glibc
#endif

/// Who owns the host changes of a journal: an exclusive lock (flock) on `<state file>.lock`, held for the
/// owner's whole life and released by the kernel when it exits, however it exits. A second instance that
/// finds the lock held must leave everything alone (the changes belong to a running process); one that gets
/// it may undo what the file records (their owner is gone).
public final class HostChangeLock: @unchecked Sendable {
    /// The lock is held by a running process (its pid as it wrote it, when readable).
    public struct Held: Error, CustomStringConvertible {
        public var path: String
        public var ownerPID: Int32?
        /// Who holds it (`tunnel-client --full-tunnel`).
        public var program: String
        public var description: String {
            let owner = self.ownerPID.map { " (pid \($0))" } ?? ""
            return "another \(self.program) is running in this network namespace\(owner), and owns the host changes "
                + "it made (routes, resolver, firewall, forwarding); stop it first (lock \(self.path))"
        }
    }

    /// The lock could not be taken for another reason (its directory cannot be made, ...).
    public struct Failed: Error, CustomStringConvertible {
        public var description: String
    }

    public let path: String
    private var descriptor: Int32

    /// Takes the lock for the journal at `statePath`, or throws `Held` / `Failed`.
    public init(statePath: String, program: String) throws {
        let path = statePath + ".lock"
        do {
            try HostChangeJournal.checkDirectory(of: statePath)
        } catch {
            throw Failed(
                description: "\(error)"
                    + (error.permissionDenied ? " (full-tunnel mode needs root or CAP_NET_ADMIN)" : "")
            )
        }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            let denied = errno == EACCES || errno == EPERM
            let reason = String(cString: strerror(errno))
            throw Failed(
                description: "cannot open \(path): \(reason)"
                    + (denied ? " (full-tunnel mode needs root or CAP_NET_ADMIN)" : "")
            )
        }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let busy = errno == EWOULDBLOCK
            let reason = String(cString: strerror(errno))
            var buffer = [UInt8](repeating: 0, count: 32)
            let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            close(fd)
            guard busy else { throw Failed(description: "cannot lock \(path): \(reason)") }
            let digits = buffer[0..<max(count, 0)].prefix { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
            throw Held(path: path, ownerPID: Int32(String(decoding: digits, as: UTF8.self)), program: program)
        }
        // Our pid, for the message a second instance prints.
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        self.path = path
        self.descriptor = fd
    }

    /// Lets go of the lock (it also goes with the process).
    public func release() {
        guard self.descriptor >= 0 else { return }
        // The file stays: unlinking it would let a process that opened it before the unlink lock the old
        // file while a third locks a new one.
        close(self.descriptor)
        self.descriptor = -1
    }

    deinit { self.release() }
}
