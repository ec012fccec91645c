import NIOCore
import TunnelProtocol

#if canImport(Glibc)
import Glibc
#endif

/// The socket side of a `SendQueueBudget` for one tunnel connection: reads `TCP_INFO` (the pacing rate, the
/// kernel's unsent bytes), applies the limit to the socket (`TCP_NOTSENT_LOWAT`: the kernel takes writes only
/// while fewer bytes than that are unsent) and the channel's watermarks, and wakes the output once the kernel
/// has sent enough. Used on the connection's event loop only.
final class SocketSendQueue {
    private var budget = SendQueueBudget()
    private var wake: Scheduled<Void>?
    /// Produces the connection's output again (set once by the handler).
    var resume: (() -> Void)?

    /// How many bytes of records to write now (at most `wanted`), or nil when the kernel holds enough: then
    /// `resume` runs once it has sent about half of it.
    func allowance(wanted: Int, queued: Int, channel: any Channel) -> Int? {
        var allowed = min(wanted, self.budget.limit)
        guard self.budget.needsKernelCheck(beforeWriting: queued), let info = TCPInfo.of(channel) else {
            return allowed
        }
        switch self.budget.decide(notSent: Int(info.notSentBytes)) {
        case .write(let room):
            allowed = min(allowed, room)
            return allowed
        case .wait(let delay):
            if self.wake == nil {
                self.wake = channel.eventLoop.assumeIsolated().scheduleTask(in: delay) {
                    self.wake = nil
                    self.resume?()
                }
            }
            return nil
        }
    }

    /// `bytes` were handed to the socket.
    func wrote(_ bytes: Int) {
        self.budget.wrote(bytes)
    }

    /// Reads the pacing rate when it is time to, and applies a limit that moved. Call after the writes: the
    /// system calls then delay no packet.
    func measureIfDue(channel: any Channel, now: NIODeadline) {
        guard self.budget.needsMeasurement(now: now), let info = TCPInfo.of(channel),
            let limit = self.budget.measured(pacingRate: info.pacingRate, now: now)
        else { return }
        let marks = self.budget.waterMarks
        channel.setOption(
            .writeBufferWaterMark,
            value: ChannelOptions.Types.WriteBufferWaterMark(low: marks.low, high: marks.high)
        ).whenFailure { _ in }
        if let provider = channel as? any SocketOptionProvider {
            provider.unsafeSetSocketOption(
                level: SocketOptionLevel(IPPROTO_TCP),
                name: SocketOptionName(TCP_NOTSENT_LOWAT),
                value: Int32(limit)
            ).whenFailure { _ in }
        }
    }
}
