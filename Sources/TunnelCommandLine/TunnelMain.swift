/// Entry points of the two executables (kept here so the executable targets stay one line each).
public enum TunnelMain {
    public static func server() async -> Never { await Entry.main(TunnelServerCommand.self, name: "tunnel-server") }
    public static func client() async -> Never { await Entry.main(TunnelClientCommand.self, name: "tunnel-client") }
}
