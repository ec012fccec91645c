import NIOConcurrencyHelpers
import NIOCore
import TunnelConfig
import TunnelCrypto
import TunnelProtocol
import TunnelRuntime
import TunnelTransport

/// State the server shares across all its connections (and event loops): the authorized keys, the replay
/// table, which session currently serves each client key, and how many handshakes are in progress.
final class ServerSessionRegistry: Sendable {
    /// A live tunnel, reachable from any thread through its event loop.
    struct Handle: Sendable {
        let id: ObjectIdentifier
        let handler: NIOLoopBound<TunnelConnectionHandler>
        var eventLoop: any EventLoop { self.handler.eventLoop }
    }

    private struct State {
        var replay = ReplayTable()
        var activeByKey: [PublicKey: Handle] = [:]
        var all: [ObjectIdentifier: Handle] = [:]
        /// Unauthenticated connections, by id: their source, and their handles oldest first, overall and per
        /// source (ids that finished are skipped when met in `oldest`).
        var pending: [ObjectIdentifier: [UInt8]] = [:]
        var oldest = CircularBuffer<Handle>(initialCapacity: 64)
        var pendingBySource: [[UInt8]: [Handle]] = [:]
        var shuttingDown = false
        /// The address each active session of a key comes from, and how often sessions of a key were
        /// replaced from another address lately (two machines sharing one key).
        var activeAddress: [PublicKey: String] = [:]
        var flapping: [PublicKey: Flapping] = [:]
        /// Sessions their client may resume (docs/PROTOCOL.md §7), established or kept after their connection
        /// broke: by session id, and the one of each client key (at most one per key).
        var resumable: [[UInt8]: Resumable] = [:]
        var resumableByKey: [PublicKey: [UInt8]] = [:]
        /// What the sessions that ended carried (status totals).
        var endedTraffic = TrafficFigures()
    }

    /// A session its client may resume.
    struct Resumable {
        let candidate: ResumeCandidate
        let handle: Handle
    }

    struct Flapping {
        var since: NIODeadline
        var count = 0
        var addresses: [String] = []
        var warned: NIODeadline?
    }

    /// What becomes of a new connection.
    enum Admission {
        /// It may handshake; `shed` is an older pending connection to close to make room (nil when there was).
        case admitted(shed: Handle?)
        /// The server is stopping.
        case refused
    }

    /// The keys allowed now (replaced by `reload`).
    var authorizedKeys: AuthorizedKeys { self.keys.withLockedValue { $0 } }
    private let keys: NIOLockedValueBox<AuthorizedKeys>
    let maxPendingHandshakes: Int
    /// Most pending handshakes from one source (an IPv4 address or an IPv6 /64).
    let maxPendingPerSource: Int
    private let state = NIOLockedValueBox(State())
    /// Lines about failed handshakes, throttled per source.
    private let handshakeLog = NIOLockedValueBox(LogThrottle<[UInt8]>())

    init(authorizedKeys: AuthorizedKeys, maxPendingHandshakes: Int) {
        self.keys = NIOLockedValueBox(authorizedKeys)
        self.maxPendingHandshakes = maxPendingHandshakes
        self.maxPendingPerSource = max(1, min(maxPendingHandshakes, max(4, maxPendingHandshakes / 16)))
    }

    // MARK: - Reload

    /// Puts `keys` in place of the authorized keys. Returns the sessions (active or kept for resuming) of keys
    /// no longer listed, to be closed: from now on their handshakes and resumes are refused.
    func replaceAuthorizedKeys(_ keys: AuthorizedKeys) -> [(key: PublicKey, handle: Handle)] {
        let listed = Set(keys.entries.map(\.key))
        self.keys.withLockedValue { $0 = keys }
        return self.state.withLockedValue { state in
            var removed: [(key: PublicKey, handle: Handle)] = []
            var seen = Set<ObjectIdentifier>()
            for (key, handle) in state.activeByKey where !listed.contains(key) && seen.insert(handle.id).inserted {
                removed.append((key, handle))
            }
            for (key, id) in state.resumableByKey where !listed.contains(key) {
                if let kept = state.resumable.removeValue(forKey: id), seen.insert(kept.handle.id).inserted {
                    removed.append((key, kept.handle))
                }
                state.resumableByKey.removeValue(forKey: key)
            }
            return removed
        }
    }

    // MARK: - Status

    /// The sessions to report: each key's active one, and those kept for their client to resume.
    func sessionsToReport() -> [Handle] {
        self.state.withLockedValue { state in
            var seen = Set<ObjectIdentifier>()
            var handles: [Handle] = []
            for handle in Array(state.activeByKey.values) + state.resumable.values.map(\.handle)
            where seen.insert(handle.id).inserted {
                handles.append(handle)
            }
            return handles
        }
    }

    /// Handshakes in progress.
    var handshakesInProgress: Int { self.state.withLockedValue { $0.pending.count } }

    /// A session ended: what it carried stays in the totals.
    func sessionEnded(_ traffic: TrafficFigures) {
        self.state.withLockedValue { $0.endedTraffic.add(traffic.ended) }
    }

    var endedTraffic: TrafficFigures { self.state.withLockedValue { $0.endedTraffic } }

    /// Counts a new unauthenticated connection from `source`. A source that already has its share of pending
    /// handshakes, or a server with all its slots taken, gives up its oldest pending one (returned to be
    /// closed): a stranger holding idle connections open can delay only its own, never lock other clients out.
    func beginHandshake(_ handle: Handle, source: [UInt8]) -> Admission {
        self.state.withLockedValue { state in
            guard !state.shuttingDown else { return .refused }
            var shed: Handle? = nil
            if let mine = state.pendingBySource[source], mine.count >= self.maxPendingPerSource {
                shed = mine.first
            } else if state.pending.count >= self.maxPendingHandshakes {
                while let candidate = state.oldest.popFirst() {
                    if state.pending[candidate.id] != nil {
                        shed = candidate
                        break
                    }
                }
            }
            if let shed { Self.removePending(shed.id, from: &state) }
            state.pending[handle.id] = source
            state.oldest.append(handle)
            state.pendingBySource[source, default: []].append(handle)
            state.all[handle.id] = handle
            return .admitted(shed: shed)
        }
    }

    /// The handshake of `id` ended (established, failed or closed); once per connection at most.
    func endHandshake(_ id: ObjectIdentifier) {
        self.state.withLockedValue { state in Self.removePending(id, from: &state) }
    }

    private static func removePending(_ id: ObjectIdentifier, from state: inout State) {
        guard let source = state.pending.removeValue(forKey: id) else { return }
        state.pendingBySource[source]?.removeAll { $0.id == id }
        if state.pendingBySource[source]?.isEmpty == true { state.pendingBySource.removeValue(forKey: source) }
        // `oldest` keeps it until it comes to the front; compact it when stale entries dominate.
        if state.oldest.count > 2 * state.pending.count + 64 {
            state.oldest = CircularBuffer(state.oldest.filter { state.pending[$0.id] != nil })
        }
    }

    /// Whether to log a failed handshake from `source` (strangers get a few lines a minute, then a summary).
    func shouldLogFailedHandshake(source: [UInt8]) -> LogThrottle<[UInt8]>.Decision {
        self.handshakeLog.withLockedValue { $0.event(from: source, now: .now()) }
    }

    /// The summary lines due: failed handshakes not logged, per source, for windows that are over.
    func failedHandshakeSummaries() -> [String] {
        let due = self.handshakeLog.withLockedValue { $0.due(now: .now()) }
        return due.map { entry in
            let from = entry.source.map { Self.describeSource($0) } ?? "other sources"
            return "\(entry.suppressed) more failed handshake(s) from \(from) in the last minute were not logged"
        }
    }

    /// A source key as text: an IPv4 address, or an IPv6 /64.
    static func describeSource(_ key: [UInt8]) -> String {
        if key.count == 4, let address = IPAddress(bytes: key) { return address.description }
        if key.count == 8, let address = IPAddress(bytes: key + [UInt8](repeating: 0, count: 8)) {
            return "\(address)/64"
        }
        return "an unknown source"
    }

    /// The key pending handshakes are counted by: an IPv4 address, or the /64 of an IPv6 one.
    static func sourceKey(_ address: SocketAddress?) -> [UInt8] {
        guard let bytes = address?.unmappedBytes else { return [] }
        return bytes.count == 16 ? Array(bytes[0..<8]) : bytes
    }

    func checkReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict {
        self.state.withLockedValue { $0.replay.check(key: key, timestamp: timestamp, now: .now()) }
    }

    /// Makes `handle` the session of `key` (after key confirmation); returns the session it replaces.
    /// Makes `handle` the session of `key`; returns the session it replaces (to be closed), and the
    /// addresses to name when sessions of this key keep replacing each other from different addresses (three
    /// times in a minute: two machines share one key), at most once a minute.
    func activate(
        key: PublicKey,
        handle: Handle,
        address: String,
        now: NIODeadline = .now()
    ) -> (previous: Handle?, sharedBy: [String]?) {
        self.state.withLockedValue { state in
            let previous = state.activeByKey[key]
            state.activeByKey[key] = handle
            guard let previous, previous.id != handle.id else {
                state.activeAddress[key] = address
                return (nil, nil)
            }
            let previousAddress = state.activeAddress[key]
            state.activeAddress[key] = address
            guard let previousAddress, previousAddress != address else { return (previous, nil) }
            var flapping = state.flapping[key] ?? Flapping(since: now)
            if now - flapping.since > .seconds(60) { flapping = Flapping(since: now, warned: flapping.warned) }
            flapping.count += 1
            for a in [previousAddress, address] where !flapping.addresses.contains(a) { flapping.addresses.append(a) }
            var sharedBy: [String]? = nil
            if flapping.count >= 3, flapping.warned.map({ now - $0 >= .seconds(60) }) ?? true {
                flapping.warned = now
                sharedBy = flapping.addresses
            }
            state.flapping[key] = flapping
            if state.flapping.count > 4096 {
                state.flapping = state.flapping.filter { now - $0.value.since <= .seconds(60) }
            }
            return (previous, sharedBy)
        }
    }

    func remove(_ handle: Handle, key: PublicKey?) {
        self.state.withLockedValue { state in
            state.all.removeValue(forKey: handle.id)
            if let key, let id = state.resumableByKey[key], state.resumable[id]?.handle.id == handle.id {
                state.resumable.removeValue(forKey: id)
                state.resumableByKey.removeValue(forKey: key)
            }
            if let key, state.activeByKey[key]?.id == handle.id {
                state.activeByKey.removeValue(forKey: key)
                state.activeAddress.removeValue(forKey: key)
            }
        }
    }

    /// The resumable session of `handle` (established, or kept after its connection broke) is the one its
    /// client may resume (docs/PROTOCOL.md §7): one per client key. Returns the key's previous one, if another.
    func registerResumable(_ handle: Handle, key: PublicKey, candidate: ResumeCandidate) -> Handle? {
        self.state.withLockedValue { state in
            var older: Handle? = nil
            if let id = state.resumableByKey[key], let entry = state.resumable.removeValue(forKey: id),
                entry.handle.id != handle.id
            {
                older = entry.handle
            }
            state.resumable[candidate.sessionID] = Resumable(candidate: candidate, handle: handle)
            state.resumableByKey[key] = candidate.sessionID
            return older
        }
    }

    /// The session of `handle` lost its connection: it is no longer the key's active session (it stays
    /// resumable).
    func detach(_ handle: Handle, key: PublicKey) {
        self.state.withLockedValue { state in
            if state.activeByKey[key]?.id == handle.id {
                state.activeByKey.removeValue(forKey: key)
                state.activeAddress.removeValue(forKey: key)
            }
        }
    }

    /// What a RESUME naming `id` is checked against, if the client holding `key` kept such a session.
    func resumeCandidate(id: [UInt8], key: PublicKey) -> ResumeCandidate? {
        self.state.withLockedValue { state in
            guard let entry = state.resumable[id], entry.candidate.clientKey == key else { return nil }
            return entry.candidate
        }
    }

    /// Takes the resumable session `id` for a connection that proved it may resume it (nil if it was given
    /// up since).
    func claimResumable(id: [UInt8]) -> Handle? {
        self.state.withLockedValue { state in
            guard let entry = state.resumable.removeValue(forKey: id) else { return nil }
            if state.resumableByKey[entry.candidate.clientKey] == id {
                state.resumableByKey.removeValue(forKey: entry.candidate.clientKey)
            }
            return entry.handle
        }
    }

    /// Forgets `key`'s resumable session if it is still `handleID`'s (its grace period ended); returns it.
    func dropResumable(key: PublicKey, only handleID: ObjectIdentifier) -> Handle? {
        self.state.withLockedValue { state in
            guard let id = state.resumableByKey[key], let entry = state.resumable[id],
                entry.handle.id == handleID
            else { return nil }
            state.resumable.removeValue(forKey: id)
            state.resumableByKey.removeValue(forKey: key)
            return entry.handle
        }
    }

    /// Stops admitting connections and returns every live session.
    func beginShutdown() -> [Handle] {
        self.state.withLockedValue { state in
            state.shuttingDown = true
            return Array(state.all.values)
        }
    }
}
