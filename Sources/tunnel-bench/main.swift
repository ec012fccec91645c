import Foundation
import Glibc

// tunnel-bench: the project's own benchmark, measured through the SOCKS port.
//
//   tunnel-bench                       start our tunnel-server + tunnel-client (next to this binary) and measure
//   tunnel-bench --proxy PORT          measure any SOCKS5 proxy on 127.0.0.1:PORT (ssh -D, ss-local, ...)
//   tunnel-bench --direct              no proxy: the machine's own limit with the same client and targets
//   options: --quick (small sizes), --label NAME, --only bulk,parallel,rr,connect,idle

func runBenchmarks() {
    let arguments = Array(CommandLine.arguments.dropFirst())
    func option(_ name: String) -> String? {
        guard let i = arguments.firstIndex(of: name), i + 1 < arguments.count else { return nil }
        return arguments[i + 1]
    }
    if arguments.contains("--help") || arguments.contains("-h") {
        print(
            """
            USAGE: tunnel-bench [--proxy PORT | --direct] [--quick] [--label NAME] [--only LIST] [--bin-dir DIR]

            Measures through a SOCKS5 port on 127.0.0.1: single-stream throughput (down and up, every byte checked),
            16-stream aggregate, request/response latency (64 B echo, p50/p99) alone and beside a bulk stream, new
            connections per second (8 threads: connect + SOCKS + 32 B echo + close), and memory per idle stream with
            1000 and 5000 streams. Without --proxy/--direct it starts tunnel-server and tunnel-client from --bin-dir
            (default: the directory of this binary) with fresh keys, and also reports their CPU seconds per GiB and RSS.
            It also measures UDP through SOCKS5 UDP ASSOCIATE (64 B round trips, and 1200 B datagram throughput with the
            share delivered) and a download through HTTP CONNECT on the same port.
            With flood, a download alone and beside an unpaced flood of 1200 B datagrams through UDP ASSOCIATE.
            LIST: any of bulk, parallel, rr, connect, idle, udp, http, flood (default: all).
            """
        )
        exit(0)
    }
    let quick = arguments.contains("--quick")
    let only = Set(
        (option("--only") ?? "bulk,parallel,rr,connect,idle,udp,http,flood").split(separator: ",").map(String.init)
    )
    signal(SIGPIPE, SIG_IGN)
    Sock.raiseFileLimit()

    let proxy: ProxyUnderTest
    if let port = option("--proxy").flatMap(UInt16.init) {
        proxy = ProxyUnderTest(label: option("--label") ?? "proxy:\(port)", socksPort: port, watched: [])
    } else if arguments.contains("--direct") {
        proxy = ProxyUnderTest(label: "direct", socksPort: nil, watched: [])
    } else {
        let executable =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let binDir = option("--bin-dir") ?? URL(fileURLWithPath: executable).deletingLastPathComponent().path
        do {
            proxy = try ProxyUnderTest.startTunnel(binDirectory: binDir, extraClientArguments: [])
        } catch {
            printError("tunnel-bench: cannot start the tunnel from \(binDir): \(error)")
            exit(2)
        }
    }
    defer { proxy.stop() }

    let targets: Targets
    do { targets = try Targets() } catch {
        printError("tunnel-bench: \(error)")
        exit(2)
    }
    let bench = Bench(proxyPort: proxy.socksPort, targets: targets)

    var rows: [(String, String)] = []
    func report(_ name: String, _ value: String) {
        rows.append((name, value))
        print(name.padding(toLength: 36, withPad: " ", startingAt: 0) + value)
        fflush(nil)
    }
    func cpu() -> [Double] { proxy.watched.map { ProcessStats.cpuSeconds($0.pid) } }
    func cpuNote(_ before: [Double], gib: Double) -> String {
        guard !proxy.watched.isEmpty else { return "" }
        let after = cpu()
        let parts = zip(proxy.watched, zip(before, after)).map {
            String(format: "%@ %.2f", $0.0.name as NSString, ($0.1.1 - $0.1.0) / gib)
        }
        let total = zip(before, after).map { $0.1 - $0.0 }.reduce(0, +) / gib
        return String(format: "  (CPU-s/GiB: %@, both %.2f)", parts.joined(separator: ", ") as NSString, total)
    }

    print("tunnel-bench: \(proxy.label)\(proxy.socksPort.map { " on 127.0.0.1:\($0)" } ?? "")")
    do {
        if only.contains("bulk") {
            let mib: UInt64 = quick ? 128 : 1024
            var before = cpu()
            let down = try bench.download(mib << 20)
            report(
                "single stream down, \(mib) MiB",
                String(format: "%7.1f MiB/s", Double(mib) / down) + cpuNote(before, gib: Double(mib) / 1024)
            )
            before = cpu()
            let up = try bench.upload(mib << 20)
            report(
                "single stream up, \(mib) MiB",
                String(format: "%7.1f MiB/s", Double(mib) / up) + cpuNote(before, gib: Double(mib) / 1024)
            )
        }
        if only.contains("parallel") {
            let each: UInt64 = quick ? 8 : 64
            let before = cpu()
            let (total, perStream) = try bench.parallelDownloads(streams: 16, bytes: each << 20)
            let rates = perStream.map { Double(each) / $0 }
            report(
                "16 streams down, \(each) MiB each",
                String(
                    format: "%7.1f MiB/s aggregate, slowest/fastest %.2f",
                    Double(each * 16) / total,
                    rates.min()! / rates.max()!
                )
                    + cpuNote(before, gib: Double(each * 16) / 1024)
            )
        }
        if only.contains("rr") {
            let count = quick ? 2000 : 10000
            let alone = try bench.requestResponse(count: count, size: 64)
            report(
                "rr 64 B, alone",
                String(format: "p50 %6.1f us  p99 %6.1f us", percentile(alone, 50), percentile(alone, 99))
            )
            let stopBulk = try bench.backgroundBulk()
            usleep(300_000)
            let beside = try bench.requestResponse(count: count, size: 64)
            let bulkRate = stopBulk()
            report(
                "rr 64 B, beside a bulk download",
                String(
                    format: "p50 %6.1f us  p99 %6.1f us  (bulk ran at %.0f MiB/s)",
                    percentile(beside, 50),
                    percentile(beside, 99),
                    bulkRate
                )
            )
        }
        if only.contains("http") {
            let mib: UInt64 = quick ? 128 : 1024
            let before = cpu()
            let seconds = try bench.downloadViaHTTPConnect(mib << 20)
            report(
                "HTTP CONNECT down, \(mib) MiB",
                String(format: "%7.1f MiB/s", Double(mib) / seconds) + cpuNote(before, gib: Double(mib) / 1024)
            )
        }
        if only.contains("udp") {
            let udp = try UDPTarget()
            let count = quick ? 1000 : 5000
            let (latencies, lost) = try bench.udpRequestResponse(udp: udp, count: count, size: 64)
            report(
                "udp rr 64 B",
                String(
                    format: "p50 %6.1f us  p99 %6.1f us  (%d of %d lost)",
                    percentile(latencies, 50),
                    percentile(latencies, 99),
                    lost,
                    count + 50
                )
            )
            let datagrams = quick ? 20_000 : 200_000
            let (seconds, delivered) = try bench.udpThroughput(udp: udp, datagrams: datagrams, size: 1200)
            report(
                "udp 1200 B datagrams, one way",
                String(
                    format: "%7.1f MiB/s delivered, %.0f datagrams/s sent, %.1f%% dropped",
                    Double(delivered * 1200) / seconds / 1_048_576,
                    Double(datagrams) / seconds,
                    100 * Double(datagrams - delivered) / Double(datagrams)
                )
            )
        }
        if only.contains("flood") {
            // A TCP download alone, then beside an unpaced UDP flood through the same proxy.
            let mib: UInt64 = quick ? 128 : 512
            let alone = Double(mib) / (try bench.download(mib << 20))
            let udp = try UDPTarget()
            let stopFlood = try bench.udpFlood(udp: udp, size: 1200)
            usleep(200_000)
            let beside = Double(mib) / (try bench.download(mib << 20))
            let (sent, delivered) = stopFlood()
            report(
                "download beside a UDP flood, \(mib) MiB",
                String(
                    format: "%7.1f MiB/s (alone %.1f: %.0f%%); flood %d datagrams sent, %.1f%% delivered",
                    beside,
                    alone,
                    100 * beside / alone,
                    sent,
                    100 * Double(delivered) / Double(max(sent, 1))
                )
            )
        }
        if only.contains("connect") {
            let seconds = quick ? 1.0 : 3.0
            let (ok, errors) = bench.connectLoop(threads: 8, seconds: seconds)
            report(
                "new connections (8 threads)",
                String(format: "%7.0f conn/s", Double(ok) / seconds) + (errors > 0 ? "  (\(errors) errors)" : "")
            )
        }
        if only.contains("idle") {
            for count in quick ? [200] : [1000, 5000] {
                usleep(500_000)
                let rssBefore = proxy.watched.map { ProcessStats.rssKiB($0.pid) }
                let (fds, seconds) = try bench.openIdle(count: count)
                usleep(500_000)
                let rssDuring = proxy.watched.map { ProcessStats.rssKiB($0.pid) }
                let alive = bench.checkIdle(fds)
                for fd in fds { close(fd) }
                var memory = ""
                if !proxy.watched.isEmpty {
                    memory =
                        "  memory per stream: "
                        + zip(proxy.watched, zip(rssBefore, rssDuring)).map {
                            String(
                                format: "%@ %.1f KB",
                                $0.0.name as NSString,
                                Double($0.1.1 - $0.1.0) * 1024 / Double(count) / 1000
                            )
                        }.joined(separator: ", ")
                }
                report(
                    "\(count) idle streams",
                    String(format: "opened in %.2f s, %d/%d alive", seconds, alive, count) + memory
                )
            }
        }
    } catch {
        printError("tunnel-bench: \(error)")
        proxy.stop()
        exit(1)
    }

}

func printError(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

runBenchmarks()
