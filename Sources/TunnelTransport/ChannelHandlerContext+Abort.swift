import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension ChannelHandlerContext {
    /// Closes the socket with a TCP RST (SO_LINGER 0), so the other end sees an abort, never a clean EOF that it
    /// could mistake for a complete transfer.
    func closeAbortively() {
        if let provider = self.channel as? any SocketOptionProvider {
            _ = provider.setSoLinger(linger(l_onoff: 1, l_linger: 0))
        }
        self.close(promise: nil)
    }
}
