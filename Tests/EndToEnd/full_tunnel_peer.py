"""A hostile full-tunnel client built on the independent Noise implementation (noise_peer.py): asks for
full-tunnel mode, waits for its address, then sends ICMP echo requests from the sources it is told to (its own
address or anyone else's) and reports the echo replies that come back.

    full_tunnel_peer.py HOST:PORT CLIENT_PRIVATE_KEY SERVER_PUBLIC_KEY DESTINATION SOURCE:ID[,SOURCE:ID...] [HOLD]

SOURCE "-" means the assigned address. Prints "assigned ADDRESS" and one "reply ID" per echo reply. With HOLD
(seconds) it stays connected that long after the replies, reading what comes: a client of an older kind (no
packet offload) for as long as a test needs one attached.
"""

import socket
import struct
import sys
import time

from noise_peer import NoisePeer, T_PING, frame, tai64n

T_IP_PACKET, T_CONTROL = 0x08, 0x09
FEATURE_FULL_TUNNEL = 1 << 1


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(source, destination, ident):
    icmp = struct.pack(">BBHHH", 8, 0, 0, ident, 1) + b"full-tunnel-peer" * 2
    icmp = icmp[:2] + struct.pack(">H", checksum(icmp)) + icmp[4:]
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    return header[:10] + struct.pack(">H", checksum(header)) + header[12:] + icmp


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    private, server_public, destination, spec = sys.argv[2:6]
    peer = NoisePeer(host, int(port), private, server_public)
    # Handshake payload: timestamp, then the features TLV asking for full-tunnel mode.
    peer.handshake(tai64n() + struct.pack(">BHI", 0x02, 4, FEATURE_FULL_TUNNEL))
    peer.send_frames(frame(T_PING, 0, 0, b"\0" * 8))  # key confirmation: the server assigns after this
    assigned = None
    peer.sock.settimeout(10)
    while assigned is None:
        for ftype, _, _, payload in peer.recv_frames():
            if ftype != T_CONTROL:
                continue
            i = 0
            while i < len(payload):
                tag, length = struct.unpack(">BH", payload[i:i + 3])
                value = payload[i + 3:i + 3 + length]
                if tag == 0x10:
                    assigned = socket.inet_ntoa(value[:4])
                i += 3 + length
    print(f"assigned {assigned}", flush=True)
    for item in spec.split(","):
        source, ident = item.rsplit(":", 1)
        peer.send_frames(frame(T_IP_PACKET, 0, 0, icmp_echo(assigned if source == "-" else source, destination, int(ident))))
    hold = float(sys.argv[6]) if len(sys.argv) > 6 else 0
    deadline = time.time() + 3 + hold
    peer.sock.settimeout(0.5)
    while time.time() < deadline:
        try:
            frames = peer.recv_frames()
        except socket.timeout:
            continue
        for ftype, _, _, payload in frames:
            if ftype == T_IP_PACKET and len(payload) >= 28 and payload[9] == 1 and payload[20] == 0:
                print(f"reply {struct.unpack('>H', payload[24:26])[0]}", flush=True)
    peer.close()


if __name__ == "__main__":
    main()
