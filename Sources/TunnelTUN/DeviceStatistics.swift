#if canImport(Glibc)
import Glibc
#endif

/// A network device's counters as this process's network namespace shows them (`/proc/self/net/dev`).
public struct DeviceStatistics: Equatable, Sendable {
    /// Packets the kernel sent to the device: for a TUN device, the packets it queued for its reader.
    public var transmitPackets: Int
    /// Packets the kernel dropped on the way out: for a TUN device, those its queue (`txqueuelen`) had no
    /// room for because the reader did not take them in time.
    public var transmitDrops: Int

    /// The counters of `device` in a `/proc/net/dev` text, nil when it is not listed.
    public static func parse(_ text: String, device: String) -> DeviceStatistics? {
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":"), line[..<colon].drop(while: { $0 == " " }) == device
            else { continue }
            // Receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes packets errs drop ...
            let fields = line[line.index(after: colon)...].split(separator: " ").compactMap { Int($0) }
            guard fields.count >= 12 else { return nil }
            return DeviceStatistics(transmitPackets: fields[9], transmitDrops: fields[11])
        }
        return nil
    }

    /// The counters of `device` now, nil when they cannot be read.
    public static func read(device: String) -> DeviceStatistics? {
        guard let file = fopen("/proc/self/net/dev", "r") else { return nil }
        defer { fclose(file) }
        var text = ""
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), file) != nil {
            text += String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return Self.parse(text, device: device)
    }

    /// A log line for the packets the kernel dropped at `device` because its queue was full, nil when none were
    /// (or the counters cannot be read). `destination` says whom the packets were for.
    public static func transmitDropsNote(device: String, destination: String) -> String? {
        guard let statistics = Self.read(device: device), statistics.transmitDrops > 0 else { return nil }
        let total = statistics.transmitPackets + statistics.transmitDrops
        return
            "\(device): the kernel dropped \(statistics.transmitDrops) of \(total) packets for \(destination) because the device's queue was full"
    }
}
