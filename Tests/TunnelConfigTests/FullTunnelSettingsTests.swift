import Testing
import TunnelConfig
import TunnelProtocol

struct FullTunnelSettingsTests {
    @Test func serverKeys() throws {
        var file = try ConfigFile(
            path: "s.toml",
            text: """
                tun = true
                tun_pool = "10.50.0.0/16"
                tun_pool6 = "none"
                tun_mtu = 1400
                tun_dns = ["1.1.1.1", "2606:4700:4700::1111"]
                tun_name = "vpn0"
                """
        )
        var settings = ServerSettings()
        try settings.apply(file: &file)
        #expect(settings.tun.enabled)
        #expect(settings.tun.pool == CIDR.parse("10.50.0.0/16"))
        #expect(settings.tun.pool6 == .none)
        #expect(settings.tun.mtu == 1400)
        #expect(settings.tun.dns == [IPAddress.parse("1.1.1.1")!, IPAddress.parse("2606:4700:4700::1111")!])
        #expect(settings.tun.deviceName == "vpn0")
        #expect(ServerSettings().tun.pool6 == .automatic)
        #expect(ServerSettings().tun.pool == CIDR.parse("10.77.0.0/24"))
    }

    @Test(arguments: [
        "tun_pool = \"10.0.0.0/31\"", "tun_pool = \"fd00::/64\"", "tun_pool = \"10.0.0.1\"",
        "tun_pool6 = \"10.0.0.0/24\"",
        "tun_pool6 = \"fd00::/40\"", "tun_mtu = 100", "tun_mtu = 65535", "tun_dns = [\"resolver\"]",
        "tun_name = \"much-too-long-name\"", "tun_name = \"a/b\"", "tun_name = \"\"",
    ])
    func badServerValuesAreRejected(_ line: String) throws {
        var file = try ConfigFile(path: "s.toml", text: line)
        var settings = ServerSettings()
        #expect(throws: ConfigError.self) { try settings.apply(file: &file) }
    }

    @Test func clientKeys() throws {
        var file = try ConfigFile(
            path: "c.toml",
            text: """
                full_tunnel = true
                exclude = ["192.168.1.7/24", "fd00:1::/64"]
                dns = ["9.9.9.9"]
                kill_switch = true
                state_file = "/tmp/state"
                """
        )
        var settings = ClientSettings()
        try settings.apply(file: &file)
        #expect(settings.fullTunnel.enabled)
        // Host bits are cleared: `ip route` wants the network.
        #expect(settings.fullTunnel.exclude == [CIDR.parse("192.168.1.0/24")!, CIDR.parse("fd00:1::/64")!])
        #expect(settings.fullTunnel.dns == .servers([IPAddress.parse("9.9.9.9")!]))
        #expect(settings.fullTunnel.killSwitch)
        #expect(settings.fullTunnel.stateFile == "/tmp/state")
    }

    @Test func dnsChoices() throws {
        #expect(try ClientFullTunnelSettings.parseDNS(["server"], origin: "x") == .fromServer)
        #expect(try ClientFullTunnelSettings.parseDNS(["off"], origin: "x") == .unchanged)
        #expect(throws: ConfigError.self) { try ClientFullTunnelSettings.parseDNS(["off", "1.1.1.1"], origin: "x") }
        #expect(throws: ConfigError.self) { try ClientFullTunnelSettings.parseDNS([], origin: "x") }
        #expect(throws: ConfigError.self) { try ClientFullTunnelSettings.parseExcludes(["lan"], origin: "x") }
    }
}

struct DeviceNameTests {
    /// Issue 15 item 11: the name ends up inside nftables rulesets and ip(8) arguments.
    @Test(arguments: ["tunnel%d", "vpn0", "wg-home_1", "tun.lab", "abcdefghijklmno"])
    func plainNamesAreAccepted(name: String) throws {
        #expect(try ServerTUNSettings.parseDeviceName(name, origin: "--tun-name") == name)
    }

    @Test(arguments: [
        "", "a\"b", "x; flush ruleset", "tun{0}", "t%s", "%d%d", "tun 0", "a/b", "..", ".", "abcdefghijklmnop", "tün0",
    ])
    func namesThatCouldChangeARulesetAreRefused(name: String) {
        #expect(throws: ConfigError.self) { _ = try ServerTUNSettings.parseDeviceName(name, origin: "--tun-name") }
    }
}
