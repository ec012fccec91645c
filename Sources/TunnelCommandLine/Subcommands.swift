import ArgumentParser
import TunnelConfig
import TunnelCrypto

/// `keygen --out PATH [--force]`: writes a new private key (mode 0600) and prints its public key.
struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keygen",
        abstract: "Write a new X25519 private key and print its public key.",
        discussion: """
            The key file holds one line of standard base64 and is created with mode 0600. The public key is \
            printed alone, as one base64 line, on standard output.
            """
    )

    @Option(name: .long, help: ArgumentHelp("File to write the private key to.", valueName: "path"))
    var out: String

    @Flag(name: .long, help: "Overwrite the file if it exists (default: refuse).")
    var force = false

    func run() throws {
        do {
            let publicKey = try KeyFile.generate(at: self.out, force: self.force)
            print(publicKey.base64)
        } catch {
            throw ConfigError(error.description)
        }
    }
}

/// `pubkey --key PATH`: prints the public key of a private key file.
struct Pubkey: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pubkey",
        abstract: "Print the public key of a private key file."
    )

    @Option(name: .long, help: ArgumentHelp("Private key file (as written by keygen).", valueName: "path"))
    var key: String

    func run() throws {
        do {
            print(try KeyFile.load(from: self.key).key.publicKey.base64)
        } catch {
            throw ConfigError(error.description)
        }
    }
}

/// The options both programs take: a config file and the log level.
struct CommonOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "TOML config file (examples in Configs/); flags override its values. Default: none.",
            valueName: "file"
        )
    )
    var config: String?

    @Option(
        name: .customLong("log-level"),
        help: ArgumentHelp(
            "trace, debug, info, notice, warning, error or critical (default: info, or log_level in --config).",
            valueName: "level"
        )
    )
    var logLevel: String?

    @Option(
        name: .customLong("log-format"),
        help: ArgumentHelp(
            "text (default) or json: one JSON object per line, for log shippers (or log_format in --config).",
            valueName: "format"
        )
    )
    var logFormat: String?

    @Option(
        name: .customLong("control-socket"),
        help: ArgumentHelp(
            "Unix socket for status and reload (mode 0600; default: /run/PROGRAM.sock as root, else in XDG_RUNTIME_DIR; none: no socket).",
            valueName: "path"
        )
    )
    var controlSocket: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Serve Prometheus metrics at http://HOST:PORT/metrics (default: off; use a loopback HOST unless the network may see them).",
            valueName: "host:port"
        )
    )
    var metrics: String?
}
