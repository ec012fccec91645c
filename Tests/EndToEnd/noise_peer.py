"""A Noise_IK initiator written against the PyPI `noiseprotocol` package: an independent implementation of the
handshake and record layer, used to talk to the real tunnel-server."""

import base64
import socket
import struct
import time

from noise.connection import Keypair, NoiseConnection

PROLOGUE = b"tunnel/1"
T_DATA, T_OPEN, T_OPEN_RESULT, T_WINDOW, T_RESET, T_GOAWAY, T_PING = 0, 1, 2, 3, 4, 5, 6
T_CLOSE = 0x0B
F_FIN, F_ACK = 0x01, 0x02


def tai64n(ns=None):
    ns = time.time_ns() if ns is None else ns
    return struct.pack(">QI", 0x400000000000000A + ns // 10**9, ns % 10**9)


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("peer closed")
        b += c
    return b


def send_msg(s, m):
    s.sendall(struct.pack(">H", len(m)) + bytes(m))


def recv_msg(s):
    return recv_exact(s, struct.unpack(">H", recv_exact(s, 2))[0])


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">BBIH", ftype, flags, stream, len(payload)) + payload


def parse_frames(plaintext):
    frames = []
    i = 0
    while i < len(plaintext):
        t, f, sid, ln = struct.unpack(">BBIH", plaintext[i:i + 8])
        frames.append((t, f, sid, plaintext[i + 8:i + 8 + ln]))
        i += 8 + ln
    return frames


class NoisePeer:
    def __init__(self, host, port, client_priv_b64, server_pub_b64, cipher="ChaChaPoly", source=None):
        self.noise = NoiseConnection.from_name(f"Noise_IK_25519_{cipher}_BLAKE2b".encode())
        self.noise.set_as_initiator()
        self.noise.set_prologue(PROLOGUE)
        self.noise.set_keypair_from_private_bytes(Keypair.STATIC, base64.b64decode(client_priv_b64))
        self.noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, base64.b64decode(server_pub_b64))
        self.noise.start_handshake()
        self.sock = socket.create_connection((host, port), timeout=10,
                                             source_address=(source, 0) if source else None)
        self.message1 = None

    def handshake(self, payload=None):
        self.message1 = self.noise.write_message(payload if payload is not None else tai64n())
        send_msg(self.sock, self.message1)
        self.server_payload = self.noise.read_message(recv_msg(self.sock))
        assert self.noise.handshake_finished
        return self.server_payload

    def send_frames(self, *frames):
        send_msg(self.sock, self.noise.encrypt(b"".join(frames)))

    def recv_frames(self):
        return parse_frames(self.noise.decrypt(recv_msg(self.sock)))

    def wait_closed(self, timeout):
        """Reads and discards until the server closes or resets the connection, or `timeout` seconds pass."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, socket.timeout):
            pass

    def close(self):
        self.sock.close()


def read_private_key(path):
    with open(path) as f:
        return f.read().strip()
