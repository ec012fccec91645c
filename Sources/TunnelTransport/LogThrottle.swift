import NIOCore

/// Keeps a stranger from filling the log: at most `burst` lines per source in each `window`, the rest
/// counted and reported in one summary line per source when its window ends. Pure (time comes in); the
/// number of sources tracked is bounded, and sources beyond that share one count.
public struct LogThrottle<Source: Hashable & Sendable>: Sendable {
    private struct Entry {
        var windowStart: NIODeadline
        var logged: Int
        var suppressed: Int
    }

    public let burst: Int
    public let window: TimeAmount
    public let maxSources: Int
    private var entries: [Source: Entry] = [:]
    /// Lines suppressed for sources that found the table full.
    private var overflow = 0
    /// Before this, pruning the full table could not free anything.
    private var nextPrune = NIODeadline.distantPast

    public init(burst: Int = 5, window: TimeAmount = .seconds(60), maxSources: Int = 4096) {
        self.burst = burst
        self.window = window
        self.maxSources = maxSources
    }

    /// What to do with one line from a source.
    public enum Decision: Equatable {
        /// Log it; `suppressedBefore` lines of this source went unlogged in its previous window (say so).
        case log(suppressedBefore: Int)
        /// Count it only.
        case suppress
    }

    public mutating func event(from source: Source, now: NIODeadline) -> Decision {
        if var entry = self.entries[source] {
            if now - entry.windowStart >= self.window {
                let before = entry.suppressed
                entry = Entry(windowStart: now, logged: 1, suppressed: 0)
                self.entries[source] = entry
                return .log(suppressedBefore: before)
            }
            if entry.logged < self.burst {
                entry.logged += 1
                self.entries[source] = entry
                return .log(suppressedBefore: 0)
            }
            entry.suppressed += 1
            self.entries[source] = entry
            return .suppress
        }
        if self.entries.count >= self.maxSources {
            // Forget sources whose window is over and that have no summary due (`due` reports the others). Only
            // when one can be over: a flood of new sources must not cost a pass over the table each.
            if now >= self.nextPrune {
                self.entries = self.entries.filter {
                    now - $0.value.windowStart < self.window || $0.value.suppressed > 0
                }
                let window = self.window
                var oldest = now
                for entry in self.entries.values where now - entry.windowStart < window {
                    oldest = min(oldest, entry.windowStart)
                }
                self.nextPrune = oldest + window
            }
            if self.entries.count >= self.maxSources {
                self.overflow += 1
                return .suppress
            }
        }
        self.entries[source] = Entry(windowStart: now, logged: 1, suppressed: 0)
        return .log(suppressedBefore: 0)
    }

    /// The summaries due: every source whose window is over with lines suppressed (and the shared count of
    /// sources beyond the table, as a nil source). Forgets the sources whose window is over.
    public mutating func due(now: NIODeadline) -> [(source: Source?, suppressed: Int)] {
        var out: [(source: Source?, suppressed: Int)] = []
        for (source, entry) in self.entries where now - entry.windowStart >= self.window {
            if entry.suppressed > 0 { out.append((source, entry.suppressed)) }
            self.entries[source] = nil
        }
        if self.overflow > 0 {
            out.append((nil, self.overflow))
            self.overflow = 0
        }
        return out
    }

    /// How many sources are tracked now.
    public var trackedSources: Int { self.entries.count }
}
