"""Asks a DNS server for NAME's A record over UDP or TCP and prints the addresses, one per line.

    python3 dns_query.py SERVER NAME udp|tcp [TIMEOUT_SECONDS]
"""

import socket
import struct
import sys


def main():
    server, name, transport = sys.argv[1:4]
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 5
    query = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    query += struct.pack(">HH", 1, 1)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    if transport == "tcp":
        sock = socket.create_connection((server, 53), timeout=timeout)
        sock.sendall(struct.pack(">H", len(query)) + query)
        length = struct.unpack(">H", sock.recv(2, socket.MSG_WAITALL))[0]
        reply = sock.recv(length, socket.MSG_WAITALL)
    else:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        sock.sendto(query, (server, 53))
        reply, _ = sock.recvfrom(4096)
    ident, flags, qd, an = struct.unpack(">HHHH", reply[:8])
    assert ident == 0x4242, "wrong id"
    offset = len(query)
    for _ in range(an):
        rtype, _, _, rdlength = struct.unpack(">HHIH", reply[offset + 2:offset + 12])
        data = reply[offset + 12:offset + 12 + rdlength]
        if rtype == 1:
            print(socket.inet_ntoa(data))
        offset += 12 + rdlength


if __name__ == "__main__":
    main()
