import TunnelCommandLine

await TunnelMain.client()
