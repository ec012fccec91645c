import Testing
import TunnelCrypto
import TunnelProtocol

@testable import TunnelConfig

struct TOMLParserTests {
    @Test func parsesTheSubset() throws {
        let text = """
            # comment
            listen = "0.0.0.0:7443"   # trailing comment
            literal = 'C:\\path'
            escaped = "tab\\there \\u00e9 \\"q\\""
            count = 1_000
            negative = -5
            on = true
            list = [
              "a", # inside
              "b",
            ]
            empty = []
            [table]
            key = 1
            "quoted key" = 2
            """
        let doc = try TOMLParser.parse(text)
        #expect(doc["listen"]?.value == .string("0.0.0.0:7443"))
        #expect(doc["literal"]?.value == .string("C:\\path"))
        #expect(doc["escaped"]?.value == .string("tab\there é \"q\""))
        #expect(doc["count"]?.value == .integer(1000))
        #expect(doc["negative"]?.value == .integer(-5))
        #expect(doc["on"]?.value == .boolean(true))
        #expect(doc["list"]?.value == .array([.string("a"), .string("b")]))
        #expect(doc["empty"]?.value == .array([]))
        #expect(doc["table.key"]?.value == .integer(1))
        #expect(doc["table.quoted key"]?.value == .integer(2))
        #expect(doc["table.key"]?.line == 14)
    }

    @Test(arguments: [
        ("key = value", 1), ("a = 1\nb = \"unterminated", 2), ("a = 1\na = 2", 2), ("x = 1.5", 1), ("= 3", 1),
        ("a = [1, 2", 1), ("a = 1 2", 1), ("[[t]]", 1), ("a = \"\\q\"", 1), ("a = 1__0", 1), ("\n\nk = tru", 3),
    ])
    func errorsNameTheLine(text: String, line: Int) {
        do {
            _ = try TOMLParser.parse(text)
            Issue.record("parsed: \(text)")
        } catch {
            #expect(error.line == line, "\(error)")
        }
    }
}

struct UnquotedValueTests {
    /// Issue 15 item 13: an address or prefix written without quotes says so, and shows the fix.
    @Test(arguments: [
        ("listen = 127.0.0.1:0", "127.0.0.1:0"), ("deny = [10.0.0.0/8]", "10.0.0.0/8"), ("t = 1.5", "1.5"),
    ])
    func unquotedValuesSayTheyNeedQuotes(text: String, word: String) {
        do {
            _ = try ConfigFile(path: "s.toml", text: text)
            Issue.record("accepted: \(text)")
        } catch {
            #expect(
                error.message
                    == "s.toml: line 1: \(word) needs quotes: write \"\(word)\" (only whole numbers go without them)"
            )
        }
    }
}

struct ValueTests {
    @Test(arguments: [
        ("127.0.0.1:1080", "127.0.0.1", 1080), ("[::1]:443", "::1", 443), ("example.com:0", "example.com", 0),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
    ])
    func endpointsParse(text: String, host: String, port: Int) throws {
        let endpoint = try Endpoint.parse(text).get()
        #expect(endpoint.host == host && endpoint.port == port)
    }

    @Test(arguments: [
        "127.0.0.1", "::1:80", "host:", ":80", "host:65536", "host:-1", "[::1]80", "[nothost]:80", "host:+5",
    ])
    func badEndpointsFail(text: String) {
        #expect(throws: ConfigProblem.self) { _ = try Endpoint.parse(text).get() }
    }

    @Test func cidrMatching() throws {
        let v4 = try #require(CIDR.parse("10.0.0.0/8"))
        #expect(v4.contains([10, 1, 2, 3]))
        #expect(!v4.contains([11, 0, 0, 0]))
        #expect(v4.contains(Array(repeating: 0, count: 10) + [0xFF, 0xFF, 10, 9, 9, 9]), "IPv4-mapped IPv6")
        let host = try #require(CIDR.parse("192.168.1.7"))
        #expect(host.prefixLength == 32 && host.contains([192, 168, 1, 7]) && !host.contains([192, 168, 1, 8]))
        let v6 = try #require(CIDR.parse("fd00::/8"))
        #expect(v6.contains([0xFD] + Array(repeating: 1, count: 15)))
        #expect(!v6.contains([0xFE] + Array(repeating: 1, count: 15)))
        #expect(try #require(CIDR.parse("0.0.0.0/0")).contains([1, 2, 3, 4]))
        for bad in ["10.0.0.0/33", "10.0.0/8", "::/129", "abc", "1.2.3.4/x", "01.2.3.4"] {
            #expect(CIDR.parse(bad) == nil, "\(bad)")
        }
    }

    @Test func ipv6Parsing() {
        #expect(IPAddress.parse("::")?.bytes == Array(repeating: 0, count: 16))
        #expect(
            IPAddress.parse("2001:db8::1")?.bytes == [0x20, 0x01, 0x0d, 0xb8] + Array(repeating: 0, count: 11) + [1]
        )
        #expect(IPAddress.parse("::ffff:1.2.3.4")?.bytes == Array(repeating: 0, count: 10) + [0xFF, 0xFF, 1, 2, 3, 4])
        #expect(IPAddress.parse("1:2:3:4:5:6:7:8:9") == nil)
        #expect(IPAddress.parse("1::2::3") == nil)
    }

    @Test func durationsAndSizes() {
        #expect(DurationParser.parse("10s") == 10_000_000_000)
        #expect(DurationParser.parse("500ms") == 500_000_000)
        #expect(DurationParser.parse("2m") == 120_000_000_000)
        #expect(DurationParser.parse("1.5s") == 1_500_000_000)
        #expect(DurationParser.parse("7") == 7_000_000_000)
        #expect(DurationParser.parse("-1s") == nil)
        #expect(DurationParser.parse("soon") == nil)
        #expect(ByteSizeParser.parse("256KiB") == 256 << 10)
        #expect(ByteSizeParser.parse("4MiB") == 4 << 20)
        #expect(ByteSizeParser.parse("1024") == 1024)
        #expect(ByteSizeParser.parse("big") == nil)
        #expect(DurationParser.parse("9999999999999h") == nil)
        #expect(DurationParser.parse("99999999999") == nil)
        #expect(DurationParser.parse("1e300s") == nil)
        #expect(DurationParser.parse("366d") == nil)
        #expect(DurationParser.parse("8760h") == Int64(31_536_000_000_000_000))
        #expect(ByteSizeParser.parse("9999999999999999GiB") == nil)
    }

    @Test func authorizedKeysParse() throws {
        let a = PrivateKey().publicKey
        let b = PrivateKey().publicKey
        let keys = try AuthorizedKeys.parse("# team\n\n\(a.base64) alice laptop\n  \(b.base64)\n").get()
        #expect(keys.entries.count == 2)
        #expect(keys.entry(for: a)?.comment == "alice laptop")
        #expect(keys.entry(for: b)?.comment == "")
        #expect(keys.entry(for: PrivateKey().publicKey) == nil)
        do {
            _ = try AuthorizedKeys.parse("\(a.base64)\nnot-a-key\n").get()
            Issue.record("accepted")
        } catch {
            #expect(error.message.hasPrefix("line 2"))
        }
    }
}

struct SettingsTests {
    @Test func serverSettingsFromFile() throws {
        var file = try ConfigFile(
            path: "s.toml",
            text: """
                listen = "127.0.0.1:9000"
                connect_timeout = "3s"
                deny = ["10.0.0.0/8", "::1"]
                ciphers = ["chachapoly"]
                stream_window = "512KiB"
                max_stream_window = "8MiB"
                """
        )
        var settings = ServerSettings()
        try settings.apply(file: &file)
        #expect(settings.listen == Endpoint(host: "127.0.0.1", port: 9000))
        #expect(settings.connectTimeout == 3_000_000_000)
        #expect(settings.deny.count == 2)
        #expect(settings.ciphers == [.chaChaPoly])
        #expect(settings.timings.streamWindow == 512 << 10)
    }

    @Test(arguments: [
        ("lisen = \"1.2.3.4:5\"", "unknown setting 'lisen'"),
        ("connect_timeout = \"fast\"", "connect_timeout"),
        ("deny = [\"10.0.0.0/99\"]", "line 1: 'deny': '10.0.0.0/99' is not an address or CIDR prefix"),
        ("listen = \"1.2.3.4:5\"\nallow = [\"10.0.0.0/8\", \"bad\"]", "line 2: 'allow': 'bad'"),
        ("ciphers = [\"rot13\"]", "rot13"),
        ("listen = 5", "must be a string"),
        ("stream_window = \"8MiB\"\nmax_stream_window = \"1MiB\"", "max_stream_window"),
        ("keepalive_interval = \"50s\"", "dead_timeout"),
        ("max_streams = 0", "max_streams"),
        ("log_level = \"loud\"", "loud"),
        // Values whose size in nanoseconds or bytes overflows 64 bits (issue 15 item 9): an error, never a trap.
        ("connect_timeout = \"9999999999999h\"", "line 1: 'connect_timeout'"),
        ("connect_timeout = 99999999999", "line 1: 'connect_timeout'"),
        ("drain_timeout = \"1e300s\"", "drain_timeout"),
        ("udp_idle_timeout = \"400d\"", "udp_idle_timeout"),
        ("stream_window = \"99999999999999999GiB\"", "stream_window"),
    ])
    func badServerSettingsNameTheProblem(text: String, needle: String) throws {
        var file = try ConfigFile(path: "s.toml", text: text)
        var settings = ServerSettings()
        do {
            try settings.apply(file: &file)
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.message.contains(needle), "\(error.message)")
            #expect(error.message.hasPrefix("s.toml"))
        }
    }

    @Test func clientSettingsFromFile() throws {
        let key = PrivateKey().publicKey
        var file = try ConfigFile(
            path: "c.toml",
            text: """
                server = "[2001:db8::1]:7443"
                server_key = "\(key.base64)"
                cipher = "chachapoly"
                connect_wait = "2s"
                """
        )
        var settings = ClientSettings()
        try settings.apply(file: &file)
        #expect(settings.servers.map(\.endpoint) == [Endpoint(host: "2001:db8::1", port: 7443)])
        #expect(settings.serverKey == key)
        #expect(settings.cipher == .fixed(.chaChaPoly))
        #expect(settings.socks == Endpoint(host: "127.0.0.1", port: 1080))
    }

    /// `servers = [...]`: each entry HOST:PORT (with the shared server_key) or a tunnel:// link (its own key).
    @Test func aServerListTakesAddressesAndLinks() throws {
        let shared = PrivateKey().publicKey
        let own = PrivateKey().publicKey
        let link = InviteLink(serverKey: own, server: Endpoint(host: "b.example", port: 7443))
        var file = try ConfigFile(
            path: "c.toml",
            text: """
                servers = ["a.example:7443", "\(link)"]
                server_key = "\(shared.base64)"
                """
        )
        var settings = ClientSettings()
        try settings.apply(file: &file)
        #expect(settings.servers.map(\.endpoint) == [Endpoint(host: "a.example", port: 7443), link.server])
        #expect(settings.servers.map(\.key) == [nil, own])

        // Both `server` and `servers`: one of them.
        var both = try ConfigFile(path: "c.toml", text: "server = \"a:1\"\nservers = [\"b:2\"]")
        var twice = ClientSettings()
        #expect(throws: ConfigError.self) { try twice.apply(file: &both) }

        // An entry without a key of its own needs the shared one.
        var settingsWithoutKey = ClientSettings()
        settingsWithoutKey.servers = [
            ClientSettings.ServerEntry(endpoint: link.server, key: own),
            ClientSettings.ServerEntry(endpoint: Endpoint(host: "c", port: 1)),
        ]
        settingsWithoutKey.keyPath = "/nonexistent"
        do {
            _ = try settingsWithoutKey.resolve()
            Issue.record("resolved")
        } catch {
            #expect(error.message.contains("c:1 has no key"))
        }
        // Full-tunnel mode takes one server.
        settingsWithoutKey.serverKey = shared
        settingsWithoutKey.fullTunnel.enabled = true
        do {
            _ = try settingsWithoutKey.resolve()
            Issue.record("resolved")
        } catch {
            #expect(error.message.contains("--full-tunnel takes one server"))
        }
    }

    @Test func missingRequiredSettingsAreNamed() {
        do {
            _ = try ClientSettings().resolve()
            Issue.record("resolved")
        } catch {
            #expect(error.message.contains("--server"))
        }
        do {
            _ = try ServerSettings().resolve()
            Issue.record("resolved")
        } catch {
            #expect(error.message.contains("--listen"))
        }
    }

    @Test func theEventLoopIsChosenAutomaticallyUnlessNamed() throws {
        #expect(ClientSettings().eventLoop == nil)
        #expect(ServerSettings().eventLoop == nil)
        for kind in EventLoopKind.allCases {
            var file = try ConfigFile(path: "c.toml", text: "event_loop = \"\(kind.rawValue)\"")
            var settings = ClientSettings()
            try settings.apply(file: &file)
            #expect(settings.eventLoop == kind)
            var serverFile = try ConfigFile(path: "s.toml", text: "event_loop = \"\(kind.rawValue)\"")
            var server = ServerSettings()
            try server.apply(file: &serverFile)
            #expect(server.eventLoop == kind)
        }
        var file = try ConfigFile(path: "c.toml", text: "event_loop = \"kqueue\"")
        var settings = ClientSettings()
        do {
            try settings.apply(file: &file)
            Issue.record("accepted event_loop = kqueue")
        } catch {
            #expect(error.message.contains("'event_loop': 'kqueue' is not one of nio, epoll"))
        }
    }

    @Test func fastOpenIsAutoByDefaultAndTakesOnlyItsThreeValues() throws {
        #expect(ClientSettings().fastOpen == .auto)
        for mode in ClientSettings.FastOpen.allCases {
            var file = try ConfigFile(path: "c.toml", text: "fast_open = \"\(mode.rawValue)\"")
            var settings = ClientSettings()
            try settings.apply(file: &file)
            #expect(settings.fastOpen == mode)
        }
        var file = try ConfigFile(path: "c.toml", text: "fast_open = \"sometimes\"")
        var settings = ClientSettings()
        do {
            try settings.apply(file: &file)
            Issue.record("accepted fast_open = sometimes")
        } catch {
            #expect(error.message.contains("line 1: 'fast_open': 'sometimes' is not one of auto, always, never"))
        }
    }
}
