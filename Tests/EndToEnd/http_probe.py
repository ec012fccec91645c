"""Sends one HTTP proxy request and prints the status line (used inside network namespaces)."""

import socket
import sys

proxy_port, request = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
s.sendall(request.encode().decode("unicode_escape").encode())
data = b""
while b"\r\n" not in data:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n")[0].decode())
s.close()
