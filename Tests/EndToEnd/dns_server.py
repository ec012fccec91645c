"""A minimal authoritative DNS server for the full-tunnel tests: answers A and AAAA for the names given on the
command line (NAME=IPv4,IPv6 ...), NXDOMAIN for anything else, over UDP. Logs each query to stdout.

    python3 dns_server.py 10.231.2.2 web.test=10.231.2.2,fd31:2::2
"""

import socket
import struct
import sys


def parse_name(data, offset):
    labels = []
    while True:
        length = data[offset]
        offset += 1
        if length == 0:
            return ".".join(labels).lower(), offset
        labels.append(data[offset:offset + length].decode("ascii", "replace"))
        offset += length


def answer(query, records):
    ident, flags, qdcount = struct.unpack(">HHH", query[:6])
    name, end = parse_name(query, 12)
    qtype, qclass = struct.unpack(">HH", query[end:end + 4])
    question = query[12:end + 4]
    answers = []
    if name in records:
        v4, v6 = records[name]
        if qtype == 1 and v4:
            answers.append(struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_pton(socket.AF_INET, v4))
        if qtype == 28 and v6:
            answers.append(struct.pack(">HHHIH", 0xC00C, 28, 1, 60, 16) + socket.inet_pton(socket.AF_INET6, v6))
        rcode = 0
    else:
        rcode = 3
    header = struct.pack(">HHHHHH", ident, 0x8400 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
    return header + question + b"".join(answers), name, qtype


def main():
    listen = sys.argv[1]
    records = {}
    for spec in sys.argv[2:]:
        name, addresses = spec.split("=")
        parts = addresses.split(",") + [""]
        records[name.lower()] = (parts[0] or None, parts[1] or None)
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((listen, 53))
    print("dns ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            reply, name, qtype = answer(data, records)
        except Exception:
            continue
        print(f"query {name} type {qtype} from {peer[0]}", flush=True)
        sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
