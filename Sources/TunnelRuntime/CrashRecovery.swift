import Logging
import TunnelConfig
import TunnelTUN

/// Taking over a state file at start: the lock that says a running process owns its changes, then undoing
/// what a previous run that did not exit cleanly left behind.
public enum CrashRecovery {
    public struct Refused: StartupFailure {
        public var description: String
    }

    /// The client's state file: `state_file`, or one per network namespace.
    public static func clientStatePath(_ settings: ClientFullTunnelSettings) -> String {
        settings.stateFile ?? HostChangeJournal.defaultPath(program: "tunnel-client")
    }

    /// The server's state file: `state_file`, or one per network namespace and listen address (several
    /// servers may run in one namespace).
    public static func serverStatePath(_ settings: ServerTUNSettings, listen: Endpoint) -> String {
        settings.stateFile
            ?? HostChangeJournal.defaultPath(program: "tunnel-server", instance: "\(listen.host)-\(listen.port)")
    }

    /// `--recover-only`: undoes what a run that did not exit cleanly left in `statePath`, and lets go.
    public static func recoverOnly(statePath: String, program: String, logger: Logger) throws(Refused) {
        let lock = try Self.takeOver(statePath: statePath, program: program, logger: logger)
        lock.release()
        logger.notice("nothing left to undo in \(statePath)")
    }

    /// Takes the lock of the journal at `statePath` (throws when another instance holds it, or the file is
    /// not safely ours) and undoes what it records.
    package static func takeOver(
        statePath: String,
        program: String,
        logger: Logger,
        commands: any HostCommands = SystemCommand.live
    ) throws(Refused) -> HostChangeLock {
        let lock: HostChangeLock
        do {
            lock = try HostChangeLock(statePath: statePath, program: program)
        } catch {
            throw Refused(description: "\(error)")
        }
        let recovery: HostChangeJournal.Recovery
        do {
            recovery = try HostChangeJournal.recover(path: statePath, commands: commands)
        } catch {
            lock.release()
            throw Refused(description: "\(error)")
        }
        if recovery.undone > 0 {
            logger.notice(
                "undid \(recovery.undone) change(s) left by a previous run that did not exit cleanly (\(statePath))"
            )
        }
        if recovery.skipped > 0 {
            logger.notice(
                "\(statePath) was written in an earlier boot or another network namespace: left its \(recovery.skipped) command(s) alone (what they undo is gone with it)"
            )
        }
        for problem in recovery.problems { logger.warning("undoing a previous run's change: \(problem)") }
        return lock
    }
}
