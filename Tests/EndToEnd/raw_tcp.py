"""Sends TCP segments conntrack cannot place (SYN+FIN, which it marks invalid) from this host's address
toward DEST:PORT, through whatever route the kernel picks. Usage: raw_tcp.py SOURCE DEST PORT COUNT"""

import socket
import struct
import sys

from full_tunnel_peer import checksum


def segment(source, dest, sport, dport, seq, flags):
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    return header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]


def main():
    source, dest, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.bind((source, 0))
    for i in range(count):
        s.sendto(segment(source, dest, 40000 + i, port, 1000 + i, 0x03), (dest, 0))  # SYN|FIN
    print(f"sent {count}")


if __name__ == "__main__":
    main()
