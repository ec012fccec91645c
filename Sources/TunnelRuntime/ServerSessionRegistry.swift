import NIOConcurrencyHelpers
import NIOCore
import TunnelConfig
import TunnelCrypto
import TunnelProtocol
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
        var pendingHandshakes = 0
        var shuttingDown = false
    }

    let authorizedKeys: AuthorizedKeys
    let maxPendingHandshakes: Int
    private let state = NIOLockedValueBox(State())

    init(authorizedKeys: AuthorizedKeys, maxPendingHandshakes: Int) {
        self.authorizedKeys = authorizedKeys
        self.maxPendingHandshakes = maxPendingHandshakes
    }

    /// Counts a new unauthenticated connection; false when too many are handshaking or the server is stopping.
    func beginHandshake(_ handle: Handle) -> Bool {
        self.state.withLockedValue { state in
            guard !state.shuttingDown, state.pendingHandshakes < self.maxPendingHandshakes else { return false }
            state.pendingHandshakes += 1
            state.all[handle.id] = handle
            return true
        }
    }

    func endHandshake() {
        self.state.withLockedValue { $0.pendingHandshakes -= 1 }
    }

    func checkReplay(key: PublicKey, timestamp: TAI64N) -> ReplayTable.Verdict {
        self.state.withLockedValue { $0.replay.check(key: key, timestamp: timestamp, now: .now()) }
    }

    /// Makes `handle` the session of `key` (after key confirmation); returns the session it replaces.
    func activate(key: PublicKey, handle: Handle) -> Handle? {
        self.state.withLockedValue { state in
            let previous = state.activeByKey[key]
            state.activeByKey[key] = handle
            return previous?.id == handle.id ? nil : previous
        }
    }

    func remove(_ handle: Handle, key: PublicKey?) {
        self.state.withLockedValue { state in
            state.all.removeValue(forKey: handle.id)
            if let key, state.activeByKey[key]?.id == handle.id { state.activeByKey.removeValue(forKey: key) }
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
