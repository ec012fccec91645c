import Testing
import TunnelCrypto

@testable import TunnelConfig

struct InviteLinkTests {
    /// A key whose base64 has both '+' and '/' (the characters URL-safe base64 replaces).
    let key = PublicKey(base64: "U83G0d5O4KIhR0iHKaw72dYC1SnI6D79xe/MGIPz+VU=")!

    @Test func printsURLSafeUnpaddedAndParsesBack() throws {
        let link = InviteLink(serverKey: self.key, server: Endpoint(host: "vpn.example.org", port: 7443))
        #expect(link.description == "tunnel://U83G0d5O4KIhR0iHKaw72dYC1SnI6D79xe_MGIPz-VU@vpn.example.org:7443")
        #expect(try InviteLink.parse(link.description).get() == link)
    }

    @Test func ipv6HostsAreBracketed() throws {
        let link = InviteLink(serverKey: self.key, server: Endpoint(host: "2001:db8::1", port: 443))
        #expect(link.description.hasSuffix("@[2001:db8::1]:443"))
        #expect(try InviteLink.parse(link.description).get() == link)
    }

    @Test func acceptsStandardBase64AndATrailingSlash() throws {
        let parsed = try InviteLink.parse("tunnel://U83G0d5O4KIhR0iHKaw72dYC1SnI6D79xe/MGIPz+VU=@h:1/").get()
        #expect(parsed.serverKey == self.key && parsed.server == Endpoint(host: "h", port: 1))
    }

    @Test(arguments: [
        ("https://x@h:1", "is not a tunnel:// link"),
        ("tunnel://h:1", "no KEY@"),
        ("tunnel://abc@h:1", "is not a base64 X25519 public key"),
        ("tunnel://U83G0d5O4KIhR0iHKaw72dYC1SnI6D79xe_MGIPz-VU@h", "the link's address"),
        ("tunnel://U83G0d5O4KIhR0iHKaw72dYC1SnI6D79xe_MGIPz-VU@h:70000", "the link's address"),
    ])
    func refusesWhatIsNotALink(text: String, why: String) {
        guard case .failure(let problem) = InviteLink.parse(text) else {
            Issue.record("\(text) parsed")
            return
        }
        #expect(problem.message.contains(why), "\(problem.message)")
    }

    @Test func theClientTakesALinkAsServerAndItsKey() throws {
        var settings = ClientSettings()
        try settings.setServer("tunnel://U83G0d5O4KIhR0iHKaw72dYC1SnI6D79xe_MGIPz-VU@h:9", origin: "--server")
        #expect(settings.servers == [ClientSettings.ServerEntry(endpoint: Endpoint(host: "h", port: 9), key: self.key)])
        settings.serverKey = PublicKey(bytes: Array(repeating: 9, count: 32))!
        settings.keyPath = "/nonexistent"
        #expect(throws: ConfigError("--server-key differs from the key in the tunnel:// link of h:9: give one of them"))
        {
            try settings.resolve()
        }
        // Plain HOST:PORT drops a link's key.
        try settings.setServer("h2:10", origin: "--server")
        #expect(settings.servers == [ClientSettings.ServerEntry(endpoint: Endpoint(host: "h2", port: 10), key: nil)])
    }
}
