"""A minimal authoritative DNS server for the full-tunnel tests: answers A and AAAA for the names given on the
command line (NAME=IPv4,IPv6 ...), NXDOMAIN for anything else, over UDP and TCP. Logs each query to stdout.

    python3 dns_server.py 10.231.2.2 web.test=10.231.2.2,fd31:2::2
"""

import socket
import struct
import sys
import threading


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
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((listen, 53))
    tcp.listen(16)
    threading.Thread(target=serve_tcp, args=(tcp, records), daemon=True).start()
    print("dns ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            reply, name, qtype = answer(data, records)
        except Exception:
            continue
        print(f"query {name} type {qtype} from {peer[0]}", flush=True)
        sock.sendto(reply, peer)


def serve_tcp(listener, records):
    while True:
        conn, peer = listener.accept()
        try:
            conn.settimeout(5)
            length = struct.unpack(">H", recv_exact(conn, 2))[0]
            reply, name, qtype = answer(recv_exact(conn, length), records)
            print(f"tcp query {name} type {qtype} from {peer[0]}", flush=True)
            conn.sendall(struct.pack(">H", len(reply)) + reply)
        except Exception:
            pass
        finally:
            conn.close()


def recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


if __name__ == "__main__":
    main()
