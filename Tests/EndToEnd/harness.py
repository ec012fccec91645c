"""Helpers for the end-to-end tests: start the real binaries, local target servers, raw SOCKS5."""

import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN_DIR = os.environ.get("TUNNEL_BIN_DIR", os.path.join(ROOT, ".build", "release"))
SERVER_BIN = os.path.join(BIN_DIR, "tunnel-server")
CLIENT_BIN = os.path.join(BIN_DIR, "tunnel-client")

# One odd-length random block: content repeats with a period that no frame or window size divides, so a
# reordered or duplicated frame changes the digest.
PATTERN = os.urandom((1 << 20) + 13)


def pattern_bytes(offset, n):
    """n bytes of the stream content starting at offset."""
    out = bytearray()
    p = len(PATTERN)
    while n > 0:
        start = offset % p
        take = min(n, p - start)
        out += PATTERN[start:start + take]
        offset += take
        n -= take
    return bytes(out)


def pattern_digest(n):
    h = hashlib.sha256()
    offset = 0
    while offset < n:
        chunk = min(n - offset, len(PATTERN) - (offset % len(PATTERN)))
        start = offset % len(PATTERN)
        h.update(memoryview(PATTERN)[start:start + chunk])
        offset += chunk
    return h.hexdigest()


class Process:
    """A started binary whose readiness line was seen; keeps its stderr in a file for diagnostics."""

    def __init__(self, args, ready_pattern, log_path, timeout=15, env=None, netns=None):
        self.args = args
        self.log_path = log_path
        self.log = open(log_path, "ab")
        cmd = list(args)
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.ready_line = None
        self.address = None
        if ready_pattern is None:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").strip()
            m = re.search(ready_pattern, text)
            if m:
                self.ready_line = text
                self.address = m.group(1)
                break
        if self.ready_line is None:
            self.kill()
            raise RuntimeError(f"{args[0]} did not become ready; log:\n{self.stderr_text()}")
        # Keep draining stdout so the process never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        try:
            for _ in self.proc.stdout:
                pass
        except Exception:
            pass

    @property
    def port(self):
        return int(self.address.rsplit(":", 1)[1])

    def stderr_text(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def signal(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout=20):
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()

    def terminate(self, timeout=20):
        """SIGTERM and wait; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


def keygen(binary, path):
    out = subprocess.run([binary, "keygen", "--out", path], capture_output=True, check=True, text=True)
    return out.stdout.strip()


# MARK: - Target servers

class TargetServer:
    """A threaded TCP server on 127.0.0.1 (and optionally [::1]) speaking a tiny command protocol:

    ECHO\\n        echo everything; on EOF, shut the write side after echoing (half-close aware)
    SOURCE n\\n    send n bytes of the pattern, then close
    SINK n\\n      read n bytes, reply with their sha256 hex and close
    HOLD\\n        never read; keep the connection open
    INFINITE\\n    send the pattern until the peer goes away
    CLOSE\\n       close at once
    """

    def __init__(self, host="127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.stopped = False
        self.connections = []
        self.lock = threading.Lock()
        self.infinite_sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            line = b""
            while not line.endswith(b"\n"):
                b = conn.recv(1)
                if not b:
                    return
                line += b
                if len(line) > 100:
                    return
            cmd = line.decode().split()
            if cmd[0] == "ECHO":
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    conn.sendall(data)
            elif cmd[0] == "SOURCE":
                n = int(cmd[1])
                offset = 0
                mv = memoryview(PATTERN)
                while offset < n:
                    start = offset % len(PATTERN)
                    take = min(n - offset, len(PATTERN) - start)
                    conn.sendall(mv[start:start + take])
                    offset += take
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
            elif cmd[0] == "SINK":
                n = int(cmd[1])
                h = hashlib.sha256()
                got = 0
                buf = bytearray(1 << 18)
                while got < n:
                    k = conn.recv_into(buf)
                    if k == 0:
                        break
                    h.update(memoryview(buf)[:k])
                    got += k
                conn.sendall(f"{got} {h.hexdigest()}\n".encode())
                conn.shutdown(socket.SHUT_WR)
            elif cmd[0] == "HOLD":
                while not self.stopped:
                    time.sleep(0.2)
            elif cmd[0] == "INFINITE":
                mv = memoryview(PATTERN)
                while True:
                    conn.sendall(mv[:1 << 16])
                    self.infinite_sent += 1 << 16
            elif cmd[0] == "CLOSE":
                return
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self):
        self.stopped = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            for c in self.connections:
                try:
                    c.close()
                except OSError:
                    pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# MARK: - Raw SOCKS5 (RFC 1928), for exact bytes and reply codes

def download_through_socks(socks_port, target_port, n, timeout=60):
    """SOURCE n from a TargetServer through the SOCKS5 port: (bytes received, their sha256 hex digest, seconds).
    Compare the digest with pattern_digest(n)."""
    s, rep, _, _ = socks5_request(socks_port, "127.0.0.1", target_port, timeout=timeout)
    assert rep == 0, f"CONNECT answered {rep}"
    s.sendall(f"SOURCE {n}\n".encode())
    h = hashlib.sha256()
    got = 0
    buf = bytearray(1 << 20)
    start = time.time()
    while (k := s.recv_into(buf)) > 0:
        h.update(memoryview(buf)[:k])
        got += k
    elapsed = time.time() - start
    s.close()
    return got, h.hexdigest(), elapsed


def socks5_request(proxy_port, host, port, command=1, timeout=10, greeting=None, atyp=None):
    """Runs the SOCKS5 handshake by hand. Returns (socket, reply_code, bound_host, bound_port)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    s.sendall(greeting if greeting is not None else b"\x05\x01\x00")
    method = recv_exact(s, 2)
    if method != b"\x05\x00":
        return s, None, method, None
    if atyp is None:
        try:
            packed = socket.inet_pton(socket.AF_INET, host)
            atyp, addr = 1, packed
        except OSError:
            try:
                packed = socket.inet_pton(socket.AF_INET6, host)
                atyp, addr = 4, packed
            except OSError:
                atyp, addr = 3, bytes([len(host)]) + host.encode()
    else:
        addr = host
    s.sendall(bytes([5, command, 0, atyp]) + addr + struct.pack(">H", port))
    return (s,) + read_socks5_reply(s)


def read_socks5_reply(s):
    head = recv_exact(s, 4)
    if len(head) < 4:
        return None, None, None
    rep, atyp = head[1], head[3]
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(s, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(s, 16))
    else:
        n = recv_exact(s, 1)[0]
        host = recv_exact(s, n).decode()
    port = struct.unpack(">H", recv_exact(s, 2))[0]
    return rep, host, port


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def recv_all(s, limit=1 << 30):
    chunks = []
    total = 0
    while True:
        chunk = s.recv(1 << 18)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            break
    return b"".join(chunks)


def recv_until_closed(s):
    """Everything the peer sends before it closes (a reset counts as a close)."""
    try:
        return recv_all(s)
    except ConnectionResetError:
        return b""


def connections_to(pid, port):
    """The established TCP connections of process `pid` to destination port `port` (from ss)."""
    out = subprocess.run(["ss", "-Htanp", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


def wait_for(predicate, timeout=10, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
