import Foundation
import Glibc

/// The SOCKS5 proxy under test: our own tunnel (started here with fresh keys), or any proxy given by port.
final class ProxyUnderTest {
    let label: String
    let socksPort: UInt16?
    /// Processes whose CPU and memory are measured.
    let watched: [(name: String, pid: Int32)]
    private var processes: [Process] = []
    private var directory: URL?

    init(label: String, socksPort: UInt16?, watched: [(String, Int32)]) {
        self.label = label
        self.socksPort = socksPort
        self.watched = watched
    }

    /// Starts tunnel-server and tunnel-client from `binDirectory` on loopback with fresh keys.
    static func startTunnel(binDirectory: String, extraClientArguments: [String]) throws -> ProxyUnderTest {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tunnel-bench-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let server = "\(binDirectory)/tunnel-server"
        let client = "\(binDirectory)/tunnel-client"
        let serverPub = try run(server, ["keygen", "--force", "--out", dir.appendingPathComponent("server.key").path])
        let clientPub = try run(client, ["keygen", "--force", "--out", dir.appendingPathComponent("client.key").path])
        try "\(clientPub) bench\n".write(
            to: dir.appendingPathComponent("authorized_keys"),
            atomically: true,
            encoding: .utf8
        )
        let (serverProcess, serverAddress) = try start(
            server,
            [
                "--listen", "127.0.0.1:0", "--key", dir.appendingPathComponent("server.key").path,
                "--authorized-keys", dir.appendingPathComponent("authorized_keys").path, "--log-level", "error",
                // The targets are on loopback, which the server's default policy refuses.
                "--allow", "127.0.0.0/8",
            ],
            ready: "tunnel-server listening on "
        )
        let (clientProcess, socksAddress) = try start(
            client,
            [
                "--server", serverAddress, "--server-key", serverPub, "--key",
                dir.appendingPathComponent("client.key").path,
                "--socks", "127.0.0.1:0", "--log-level", "error",
            ] + extraClientArguments,
            ready: "SOCKS5 listening on "
        )
        guard let port = UInt16(socksAddress.split(separator: ":").last ?? "") else {
            throw Sock.Failure(message: "bad SOCKS address \(socksAddress)")
        }
        let proxy = ProxyUnderTest(
            label: "tunnel",
            socksPort: port,
            watched: [("client", clientProcess.processIdentifier), ("server", serverProcess.processIdentifier)]
        )
        proxy.processes = [clientProcess, serverProcess]
        proxy.directory = dir
        // Wait until a stream actually goes through (the tunnel is up).
        let deadline = monotonicNanos() + 10_000_000_000
        while monotonicNanos() < deadline {
            if let fd = try? Sock.connect(port: port) {
                close(fd)
                break
            }
            usleep(50_000)
        }
        return proxy
    }

    func stop() {
        for process in self.processes where process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
        if let directory { try? FileManager.default.removeItem(at: directory) }
    }

    /// Starts `path` with its standard output on a pipe.
    private static func launch(_ path: String, _ arguments: [String]) throws -> (Process, Pipe) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        return (process, pipe)
    }

    private static func run(_ path: String, _ arguments: [String]) throws -> String {
        let (process, pipe) = try Self.launch(path, arguments)
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw Sock.Failure(message: "\(path) \(arguments.first ?? "") failed")
        }
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    private static func start(_ path: String, _ arguments: [String], ready: String) throws -> (Process, String) {
        let (process, pipe) = try Self.launch(path, arguments)
        var text = ""
        let handle = pipe.fileHandleForReading
        let deadline = monotonicNanos() + 15_000_000_000
        while monotonicNanos() < deadline {
            let data = handle.availableData
            if data.isEmpty { break }
            text += String(decoding: data, as: UTF8.self)
            if let range = text.range(of: ready), let end = text[range.upperBound...].firstIndex(of: "\n") {
                return (process, String(text[range.upperBound..<end]))
            }
        }
        process.terminate()
        throw Sock.Failure(message: "\(path) did not print '\(ready)'")
    }
}

/// CPU seconds (user + system) and resident memory of a process, from /proc.
enum ProcessStats {
    static func cpuSeconds(_ pid: Int32) -> Double {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    static func rssKiB(_ pid: Int32) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "0") ?? 0
        }
        return 0
    }
}
