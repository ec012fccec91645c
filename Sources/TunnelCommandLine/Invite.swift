import ArgumentParser
import CQRCode
import TunnelConfig
import TunnelCrypto

#if canImport(Glibc)
import Glibc
#endif

/// `tunnel-server invite --host HOST[:PORT]`: the one-line link a client takes as `--server` (README, *Invites*),
/// and in a terminal the same as a QR code.
struct ServerInvite: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "invite",
        abstract: "Print a tunnel:// link (and, in a terminal, a QR code) that a client takes as --server.",
        discussion: """
            The link carries the address clients should dial and this server's public key: \
            tunnel://KEY@HOST:PORT. It holds no secret (the client still needs its own key, listed in the \
            server's authorized keys), but it does pin the server: send it over a channel the client trusts.
            """
    )

    @Option(
        name: .long,
        help: ArgumentHelp(
            "The name or address clients reach this server at, with the port unless it is the one listen names.",
            valueName: "host[:port]"
        )
    )
    var host: String

    @Option(
        name: .long,
        help: ArgumentHelp("The server's private key file (default: key in --config).", valueName: "path")
    )
    var key: String?

    @Option(
        name: .long,
        help: ArgumentHelp("The server's config file (for its key and listen port).", valueName: "file")
    )
    var config: String?

    @Flag(
        name: .long,
        inversion: .prefixedNo,
        help: "Print the QR code too (default: when standard output is a terminal)."
    )
    var qr: Bool?

    func run() throws {
        var settings = ServerSettings()
        if let config = self.config {
            var file = try ConfigFile.load(config)
            try settings.apply(file: &file)
        }
        guard let keyPath = self.key ?? settings.keyPath else {
            throw ConfigError("--key PATH is required (or key in --config)")
        }
        let publicKey: PublicKey
        do {
            publicKey = try KeyFile.load(from: keyPath).key.publicKey
        } catch {
            throw ConfigError(error.description)
        }
        let endpoint: Endpoint
        if case .success(let given) = Endpoint.parse(self.host) {
            endpoint = given
        } else if let port = settings.listen?.port, !self.host.contains(":") || self.host.hasPrefix("[") {
            let bare = self.host.hasPrefix("[") ? String(self.host.dropFirst().dropLast()) : self.host
            endpoint = Endpoint(host: bare, port: port)
        } else {
            throw ConfigError("--host: '\(self.host)' needs a port (HOST:PORT), or --config with listen")
        }
        let link = InviteLink(serverKey: publicKey, server: endpoint)
        print(link.description)
        guard self.qr ?? (isatty(1) != 0) else { return }
        var modules: UnsafeMutablePointer<UInt8>? = nil
        var failure: UnsafePointer<CChar>? = nil
        let width = Int(cqr_encode(link.description, &modules, &failure))
        guard width > 0, let modules else {
            printError("tunnel-server invite: no QR code: \(failure.map { String(cString: $0) } ?? "unknown error")")
            return
        }
        defer { cqr_free(modules) }
        print(QRText.render(Array(UnsafeBufferPointer(start: modules, count: width * width)), width: width))
    }
}

/// A QR code as terminal text: two module rows per line with half blocks, black on white forced by ANSI
/// colours (whatever the terminal's theme), with the quiet zone scanners need around it.
enum QRText {
    static let quietZone = 2

    static func render(_ modules: [UInt8], width: Int) -> String {
        let size = width + 2 * Self.quietZone
        func dark(_ x: Int, _ y: Int) -> Bool {
            let (mx, my) = (x - Self.quietZone, y - Self.quietZone)
            guard mx >= 0, my >= 0, mx < width, my < width else { return false }
            return modules[my * width + mx] != 0
        }
        var lines: [String] = []
        var y = 0
        while y < size {
            var line = "\u{1B}[30;47m"
            for x in 0..<size {
                switch (dark(x, y), y + 1 < size && dark(x, y + 1)) {
                case (true, true): line += "\u{2588}"
                case (true, false): line += "\u{2580}"
                case (false, true): line += "\u{2584}"
                case (false, false): line += " "
                }
            }
            lines.append(line + "\u{1B}[0m")
            y += 2
        }
        return lines.joined(separator: "\n")
    }
}
