import TunnelCommandLine

await TunnelMain.server()
