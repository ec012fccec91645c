#!/usr/bin/env python3
"""Soak: minutes of mixed load through the real binaries on loopback, with the server killed and restarted now
and then. Pages over the HTTP proxy and SOCKS5, bulk downloads and uploads (checked byte for byte), idle streams
that are pinged, UDP, and churn with streams reset right after their CONNECT. Every transfer that ends without an
error must be intact; afterwards the descriptors of both ends and the server's connections to the destinations
must be back where they started.

    .venv-tests/bin/python Tests/soak.py [--minutes 3]    (after the release build; Tests/run.sh makes the venv)
"""

import argparse
import hashlib
import http.client
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "EndToEnd"))
import harness  # noqa: E402
from harness import (CLIENT_BIN, SERVER_BIN, Process, TargetServer, keygen, pattern_digest,  # noqa: E402
                     recv_exact, socks5_request)
from webserver import Origin  # noqa: E402


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.values = {}

    def add(self, name, n=1):
        with self.lock:
            self.values[name] = self.values.get(name, 0) + n


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def established_to(pid, ports):
    out = subprocess.run(["ss", "-Htanp", "state", "established"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if f"pid={pid}," in line and any(f":{p} " in line.split()[3] + " " for p in ports)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--restart-every", type=float, default=45, help="seconds between server kills")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tunnel-soak-")
    server_key, client_key = os.path.join(work, "server.key"), os.path.join(work, "client.key")
    server_pub = keygen(SERVER_BIN, server_key)
    client_pub = keygen(CLIENT_BIN, client_key)
    authorized = os.path.join(work, "authorized_keys")
    with open(authorized, "w") as f:
        f.write(f"{client_pub} soak\n")
    target = TargetServer()
    origin = Origin("soak")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    threading.Thread(target=lambda: [udp.sendto(b"echo:" + d, a) for d, a in iter(lambda: udp.recvfrom(65535), None)],
                     daemon=True).start()
    udp_port = udp.getsockname()[1]
    destinations = [target.port, origin.port]

    listen = "127.0.0.1:0"

    def start_server(address, log):
        return Process([SERVER_BIN, "--listen", address, "--key", server_key, "--authorized-keys", authorized,
                        "--allow", "127.0.0.0/8", "--log-level", "info"], r"tunnel-server listening on (\S+)",
                       os.path.join(work, log))

    server = start_server(listen, "server.log")
    listen = server.address
    client = Process([CLIENT_BIN, "--server", listen, "--server-key", server_pub, "--key", client_key,
                      "--socks", "127.0.0.1:0", "--log-level", "info", "--config", write_client_config(work)],
                     r"SOCKS5 listening on (\S+)", os.path.join(work, "client.log"))
    socks = client.port
    assert harness.wait_for(lambda: "tunnel up" in client.stderr_text(), timeout=10)
    time.sleep(0.5)
    baseline = {"client": fds(client.proc.pid), "server": fds(server.proc.pid)}
    print(f"baseline descriptors: client {baseline['client']}, server {baseline['server']}", flush=True)

    counters = Counters()
    stop = threading.Event()
    errors = []

    def record_failure(kind, detail):
        counters.add(f"{kind} failed")
        if len(errors) < 20:
            errors.append(f"{kind}: {detail}")

    def pages():
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", socks, timeout=15)
                for i in range(5):
                    conn.request("GET", f"http://127.0.0.1:{origin.port}/page{i}")
                    body = conn.getresponse().read()
                    assert b"Page from soak" in body, body[:100]
                conn.close()
                counters.add("pages")
            except (OSError, http.client.HTTPException) as e:
                counters.add("pages interrupted")
            except AssertionError as e:
                record_failure("pages", e)

    def bulk_down():
        while not stop.is_set():
            n = random.choice([1 << 20, 8 << 20, 24 << 20])
            try:
                s, rep, _, _ = socks5_request(socks, "127.0.0.1", target.port, timeout=30)
                if rep != 0:
                    counters.add("bulk refused")
                    s.close()
                    time.sleep(0.2)
                    continue
                s.sendall(f"SOURCE {n}\n".encode())
                h = hashlib.sha256()
                got = 0
                while True:
                    chunk = s.recv(1 << 18)
                    if not chunk:
                        break
                    h.update(chunk)
                    got += len(chunk)
                s.close()
                # A clean end must mean a complete, intact download.
                if got != n or h.hexdigest() != pattern_digest(n):
                    record_failure("download", f"clean end after {got} of {n} bytes (digest match: {h.hexdigest() == pattern_digest(n)})")
                else:
                    counters.add("downloads")
                    counters.add("bytes down", n)
            except OSError:
                counters.add("downloads reset")

    def bulk_up():
        while not stop.is_set():
            n = random.choice([1 << 20, 8 << 20])
            try:
                s, rep, _, _ = socks5_request(socks, "127.0.0.1", target.port, timeout=30)
                if rep != 0:
                    s.close()
                    time.sleep(0.2)
                    continue
                s.sendall(f"SINK {n}\n".encode())
                offset = 0
                while offset < n:
                    block = harness.pattern_bytes(offset, min(1 << 18, n - offset))
                    s.sendall(block)
                    offset += len(block)
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    answer += chunk
                s.close()
                if answer:
                    got, digest = answer.split()
                    if int(got) != n or digest.decode() != pattern_digest(n):
                        record_failure("upload", f"the destination got {got} bytes, digest match {digest.decode() == pattern_digest(n)}")
                    else:
                        counters.add("uploads")
                        counters.add("bytes up", n)
                else:
                    counters.add("uploads reset")
            except OSError:
                counters.add("uploads reset")

    def idle_streams():
        held = []
        while not stop.is_set():
            try:
                while len(held) < 20:
                    s, rep, _, _ = socks5_request(socks, "127.0.0.1", target.port, timeout=15)
                    if rep != 0:
                        s.close()
                        break
                    s.sendall(b"ECHO\n")
                    held.append(s)
                for s in list(held):
                    try:
                        s.sendall(b"ping")
                        if recv_exact(s, 4) != b"ping":
                            raise OSError("short echo")
                        counters.add("idle pings")
                    except OSError:
                        held.remove(s)
                        s.close()
            except OSError:
                pass
            stop.wait(2)
        for s in held:
            s.close()

    def udp_load():
        while not stop.is_set():
            try:
                control = socket.create_connection(("127.0.0.1", socks), timeout=10)
                control.sendall(b"\x05\x01\x00")
                recv_exact(control, 2)
                control.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
                rep, host, port = harness.read_socks5_reply(control)
                if rep != 0:
                    control.close()
                    time.sleep(0.2)
                    continue
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.settimeout(2)
                header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", udp_port)
                for i in range(50):
                    payload = os.urandom(random.choice([20, 500, 1400, 8000]))
                    u.sendto(header + payload, (host, port))
                    try:
                        reply = u.recvfrom(65535)[0]
                        if reply[10:] != b"echo:" + payload:
                            record_failure("udp", "a datagram came back altered")
                        else:
                            counters.add("datagrams")
                    except socket.timeout:
                        counters.add("datagrams lost")
                u.close()
                control.close()
            except OSError:
                pass

    def churn():
        request = b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", target.port)
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", socks), timeout=5)
                s.sendall(request)
                time.sleep(random.choice([0, 0, 0.0005, 0.002]))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                counters.add("early resets")
            except OSError:
                pass
            time.sleep(0.01)

    workers = [pages, pages, bulk_down, bulk_down, bulk_up, idle_streams, udp_load, churn]
    threads = [threading.Thread(target=w, daemon=True) for w in workers]
    for t in threads:
        t.start()
    deadline = time.time() + options.minutes * 60
    next_restart = time.time() + options.restart_every
    restarts = 0
    while time.time() < deadline:
        time.sleep(1)
        if time.time() >= next_restart and deadline - time.time() > 20:
            server.proc.kill()
            server.proc.wait()
            time.sleep(random.uniform(0.2, 2))
            server = start_server(listen, f"server{restarts + 1}.log")
            restarts += 1
            next_restart = time.time() + options.restart_every
            print(f"server killed and restarted ({restarts})", flush=True)
    stop.set()
    for t in threads:
        t.join(60)
    time.sleep(8)   # let every stream end and every socket close
    after = {"client": fds(client.proc.pid), "server": fds(server.proc.pid)}
    left = established_to(server.proc.pid, destinations)
    print(f"after: descriptors client {after['client']} (baseline {baseline['client']}), "
          f"server {after['server']} (a fresh server with one client had {baseline['server']}); "
          f"destination connections left open: {len(left)}")
    print("counts:", dict(sorted(counters.values.items())))
    print(f"server restarts: {restarts}")
    ok = not errors and after["client"] <= baseline["client"] + 2 and after["server"] <= baseline["server"] + 2 and not left
    for e in errors:
        print("FAILURE", e)
    client.terminate()
    server.terminate()
    print("soak", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


def write_client_config(work):
    path = os.path.join(work, "client.toml")
    with open(path, "w") as f:
        f.write('reconnect_max = "1s"\n')
    return path


if __name__ == "__main__":
    main()
