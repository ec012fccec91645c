#if canImport(Glibc)
import Glibc
#endif

/// Runs the system tools that configure the host (`ip`, `nft`), waiting for them to finish.
///
/// Only at setup and teardown, never per packet. The child gets no shell: arguments go to it as they are.
public enum SystemCommand {
    public struct Result: Sendable {
        public init(status: Int32, output: String) {
            self.status = status
            self.output = output
        }
        /// Exit status (128 + signal when killed; -1 when it could not start).
        public var status: Int32
        /// Standard output and standard error together, trimmed.
        public var output: String
        public var succeeded: Bool { self.status == 0 }
    }

    public struct Failure: Error, CustomStringConvertible {
        public init(command: [String], result: Result) {
            self.command = command
            self.result = result
        }
        public var command: [String]
        public var result: Result
        public var description: String {
            let text = self.result.output.isEmpty ? "exit status \(self.result.status)" : self.result.output
            return "`\(self.command.joined(separator: " "))` failed: \(text)"
        }
    }

    /// Where the tools may live: sbin is often missing from PATH for a non-root user with CAP_NET_ADMIN.
    private static let searchDirectories = [
        "/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin",
    ]

    /// The full path of a tool, or nil when it is not installed.
    public static func locate(_ tool: String) -> String? {
        if tool.hasPrefix("/") { return access(tool, X_OK) == 0 ? tool : nil }
        var directories = Self.searchDirectories
        if let path = getenv("PATH") {
            directories += String(cString: path).split(separator: ":").map(String.init)
        }
        for directory in directories where access("\(directory)/\(tool)", X_OK) == 0 {
            return "\(directory)/\(tool)"
        }
        return nil
    }

    /// Runs `arguments` (the first is the tool), feeding `input` to its standard input.
    public static func run(_ arguments: [String], input: String? = nil) -> Result {
        guard let tool = arguments.first, let path = Self.locate(tool) else {
            return Result(status: -1, output: "\(arguments.first ?? "?"): not installed")
        }
        var outputPipe: [Int32] = [0, 0]
        var inputPipe: [Int32] = [0, 0]
        guard Self.pipeCloseOnExec(&outputPipe) else {
            return Result(status: -1, output: "pipe: \(String(cString: strerror(errno)))")
        }
        guard Self.pipeCloseOnExec(&inputPipe) else {
            close(outputPipe[0])
            close(outputPipe[1])
            return Result(status: -1, output: "pipe: \(String(cString: strerror(errno)))")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inputPipe[0], 0)
        posix_spawn_file_actions_adddup2(&actions, outputPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, outputPipe[1], 2)

        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments.dropFirst()).map { strdup($0) }
        argv.append(nil)
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, path, &actions, nil, argv, environ)
        close(inputPipe[0])
        close(outputPipe[1])
        guard spawned == 0 else {
            close(inputPipe[1])
            close(outputPipe[0])
            return Result(status: -1, output: "\(path): \(String(cString: strerror(spawned)))")
        }
        if let input {
            let bytes = Array(input.utf8)
            var offset = 0
            while offset < bytes.count {
                let n = bytes.withUnsafeBytes { write(inputPipe[1], $0.baseAddress! + offset, $0.count - offset) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                offset += n
            }
        }
        close(inputPipe[1])
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(outputPipe[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            if output.count < 1 << 20 { output += chunk[0..<n] }
        }
        close(outputPipe[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exit: Int32 = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        let text = String(decoding: output, as: UTF8.self)
        return Result(status: exit, output: text.trimmingWhitespace())
    }

    /// A pipe whose ends other children do not inherit (the child gets its copies through dup2).
    private static func pipeCloseOnExec(_ fds: inout [Int32]) -> Bool {
        guard pipe(&fds) == 0 else { return false }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        return true
    }

    /// Runs `arguments` and throws when it fails.
    @discardableResult
    public static func check(_ arguments: [String], input: String? = nil) throws(Failure) -> String {
        let result = Self.run(arguments, input: input)
        guard result.succeeded else { throw Failure(command: arguments, result: result) }
        return result.output
    }
}

/// How host setup runs its commands (`ip`, `nft`): on this system (`SystemCommand.live`), or through a test's
/// double that records them and answers as the tools would, so full-tunnel code runs in tests without root.
public protocol HostCommands: Sendable {
    /// Runs `arguments` (the first is the tool), feeding `input` to its standard input.
    func run(_ arguments: [String], input: String?) -> SystemCommand.Result
}

extension HostCommands {
    public func run(_ arguments: [String]) -> SystemCommand.Result {
        self.run(arguments, input: nil)
    }

    /// Runs `arguments` and throws when it fails.
    @discardableResult
    public func check(_ arguments: [String], input: String? = nil) throws(SystemCommand.Failure) -> String {
        let result = self.run(arguments, input: input)
        guard result.succeeded else { throw SystemCommand.Failure(command: arguments, result: result) }
        return result.output
    }
}

extension SystemCommand {
    /// The system's own tools.
    public static let live: any HostCommands = Live()

    struct Live: HostCommands {
        func run(_ arguments: [String], input: String?) -> SystemCommand.Result {
            SystemCommand.run(arguments, input: input)
        }
    }
}

extension String {
    func trimmingWhitespace() -> String {
        let scalars = self.unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }),
            let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })
        else { return "" }
        return String(scalars[first...last])
    }
}
