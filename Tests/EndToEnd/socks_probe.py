"""Runs one SOCKS5 CONNECT and prints the reply code (used inside network namespaces)."""

import sys

from harness import socks5_request

proxy_port, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s, rep, _, _ = socks5_request(proxy_port, host, port, timeout=30)
print(rep)
s.close()
