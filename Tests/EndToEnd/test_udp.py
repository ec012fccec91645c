"""SOCKS5 UDP ASSOCIATE (RFC 1928 §7) through the tunnel: DNS-like request/response by IPv4, IPv6 and name,
the association's lifetime and address check, drops, and fairness against TCP."""

import hashlib
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import socks as pysocks

import harness
from harness import recv_exact


class DNSLikeServer:
    """Answers DNS queries for A records with 10.1.2.3, and echoes anything else with a prefix.
    Listens dual-stack ([::] with V6ONLY off), so IPv4 and IPv6 clients reach the same port."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", 0))
        self.port = self.sock.getsockname()[1]
        self.seen = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.seen.append(addr[0])
            if data.startswith(b"BIG "):
                # A reply as large as UDP allows over IPv4 (asked for by size).
                self.sock.sendto(b"B" * int(data[4:]), addr)
            elif len(data) >= 12 and data[2] & 0x80 == 0 and struct.unpack(">H", data[4:6])[0] == 1:
                # A standard query with one question: answer it.
                header = data[:2] + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00"
                question = data[12:]
                answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([10, 1, 2, 3])
                self.sock.sendto(header + question + answer, addr)
            else:
                self.sock.sendto(b"echo:" + data, addr)

    def stop(self):
        self.sock.close()


def dns_query(name, query_id=0x1234):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x01\x00\x01"


def associate(socks_port, announce=("0.0.0.0", 0)):
    """Opens the control connection; returns (control socket, relay (host, port))."""
    control = socket.create_connection(("127.0.0.1", socks_port), timeout=10)
    control.sendall(b"\x05\x01\x00")
    assert recv_exact(control, 2) == b"\x05\x00"
    control.sendall(b"\x05\x03\x00\x01" + socket.inet_aton(announce[0]) + struct.pack(">H", announce[1]))
    rep, host, port = harness.read_socks5_reply(control)
    assert rep == 0, f"UDP ASSOCIATE refused: {rep}"
    return control, (host, port)


def udp_header(host, port):
    try:
        return b"\x00\x00\x00\x01" + socket.inet_pton(socket.AF_INET, host) + struct.pack(">H", port)
    except OSError:
        pass
    try:
        return b"\x00\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, host) + struct.pack(">H", port)
    except OSError:
        return b"\x00\x00\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack(">H", port)


def parse_reply(datagram):
    assert datagram[:3] == b"\x00\x00\x00"
    atyp = datagram[3]
    if atyp == 1:
        host, rest = socket.inet_ntop(socket.AF_INET, datagram[4:8]), datagram[8:]
    elif atyp == 4:
        host, rest = socket.inet_ntop(socket.AF_INET6, datagram[4:20]), datagram[20:]
    else:
        n = datagram[4]
        host, rest = datagram[5:5 + n].decode(), datagram[5 + n:]
    return host, struct.unpack(">H", rest[:2])[0], rest[2:]


@pytest.fixture
def dns():
    server = DNSLikeServer()
    yield server
    server.stop()


@pytest.mark.parametrize("target", ["127.0.0.1", "::1", "localhost"])
def test_dns_like_round_trip(tunnel, dns, target):
    tunnel.start()
    control, relay = associate(tunnel.socks_port)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    query = dns_query("example.test")
    u.sendto(udp_header(target, dns.port) + query, relay)
    reply, _ = u.recvfrom(65535)
    host, port, data = parse_reply(reply)
    assert port == dns.port
    assert host in ("127.0.0.1", "::1")  # the reply is tagged with its real source
    assert data[:2] == query[:2] and data[-4:] == bytes([10, 1, 2, 3])
    # Several more, including a large one, all come back intact.
    for i in range(20):
        payload = bytes([i]) * (100 + i * 3000)
        u.sendto(udp_header(target, dns.port) + payload, relay)
        _, _, data = parse_reply(u.recvfrom(65535)[0])
        assert data == b"echo:" + payload
    u.close()
    control.close()


def test_names_are_resolved_by_the_server_not_the_client(tunnel, dns):
    tunnel.start()
    control, relay = associate(tunnel.socks_port)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(udp_header("localhost", dns.port) + b"hi", relay)
    assert parse_reply(u.recvfrom(65535)[0])[2] == b"echo:hi"
    # The client process never asked the system resolver: the name travelled inside the tunnel.
    assert "UDP ASSOCIATE" in tunnel.client.stderr_text()
    u.close()
    control.close()


def test_pysocks_udp_client(tunnel, dns):
    tunnel.start()
    s = pysocks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.set_proxy(pysocks.SOCKS5, "127.0.0.1", tunnel.socks_port)
    s.settimeout(5)
    s.sendto(b"from pysocks", ("127.0.0.1", dns.port))
    data, _ = s.recvfrom(65535)
    assert data == b"echo:from pysocks"
    s.close()


def test_only_the_associating_application_may_use_the_relay(tunnel, dns):
    tunnel.start()
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))
    app.settimeout(3)
    control, relay = associate(tunnel.socks_port, announce=("127.0.0.1", app.getsockname()[1]))
    intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intruder.settimeout(1)
    intruder.sendto(udp_header("127.0.0.1", dns.port) + b"intruder", relay)
    with pytest.raises(socket.timeout):
        intruder.recvfrom(65535)
    app.sendto(udp_header("127.0.0.1", dns.port) + b"legit", relay)
    assert parse_reply(app.recvfrom(65535)[0])[2] == b"echo:legit"
    assert b"intruder" not in b"".join(x.encode() if isinstance(x, str) else b"" for x in dns.seen)
    control.close()


def test_fragments_and_bad_headers_are_dropped(tunnel, dns):
    tunnel.start()
    control, relay = associate(tunnel.socks_port)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(1)
    fragment = b"\x00\x00\x01" + udp_header("127.0.0.1", dns.port)[3:] + b"frag"
    u.sendto(fragment, relay)
    u.sendto(b"\x00\x00\x00\x09junk", relay)
    u.sendto(b"\x00", relay)
    with pytest.raises(socket.timeout):
        u.recvfrom(65535)
    u.settimeout(5)
    u.sendto(udp_header("127.0.0.1", dns.port) + b"whole", relay)
    assert parse_reply(u.recvfrom(65535)[0])[2] == b"echo:whole"
    control.close()


def test_association_ends_with_its_control_connection(tunnel, dns):
    tunnel.start()
    control, relay = associate(tunnel.socks_port)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(udp_header("127.0.0.1", dns.port) + b"one", relay)
    assert parse_reply(u.recvfrom(65535)[0])[2] == b"echo:one"
    control.close()
    time.sleep(0.5)
    u.settimeout(1)
    try:
        u.sendto(udp_header("127.0.0.1", dns.port) + b"two", relay)
        u.recvfrom(65535)
        pytest.fail("the relay answered after its control connection closed")
    except (socket.timeout, ConnectionRefusedError):
        pass


def timed_download(socks_port, target_port, n):
    """Downloads n bytes from the target's source through the proxy; returns bytes per second. Every byte
    must arrive: a download beside a flood may be slow, never short."""
    s, rep, _, _ = harness.socks5_request(socks_port, "127.0.0.1", target_port, timeout=60)
    assert rep == 0
    s.sendall(f"SOURCE {n}\n".encode())
    start = time.time()
    got = 0
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    s.close()
    assert got == n, f"the download got {got} of {n} bytes"
    return n / (time.time() - start)


def test_udp_flood_does_not_starve_tcp(tunnel, dns, target):
    """Heavy UDP through the same tunnel leaves a TCP download most of its speed. (On this 2-core box an
    unpaced Python flood would mostly measure CPU contention with the flooding process itself, so the flood is
    paced to ~10k datagrams/s, each echoed back: ~24 MB/s of UDP through the tunnel both ways.)"""
    tunnel.start()

    def download():
        return timed_download(tunnel.socks_port, target.port, 128 << 20)

    solo = download()
    control, relay = associate(tunnel.socks_port)
    stop = threading.Event()

    sent = [0]

    def flood():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        packet = udp_header("127.0.0.1", dns.port) + b"x" * 1200
        while not stop.is_set():
            for _ in range(100):
                try:
                    u.sendto(packet, relay)
                    sent[0] += 1
                except OSError:
                    pass
            time.sleep(0.01)
        u.close()
    threads = [threading.Thread(target=flood)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    try:
        beside = download()
    finally:
        stop.set()
        for t in threads:
            t.join()
        control.close()
    assert sent[0] > 2000
    # Starvation (datagrams holding the tunnel's queue) would leave the download a trickle. What this 2-core box
    # also shows is CPU contention with the Python flood and its echo, and the host's speed drifting between the
    # two downloads: about half of the solo speed, sometimes a little less. The bar is set below that noise.
    assert beside > solo * 0.25, (beside, solo)
    assert tunnel.client.proc.poll() is None and tunnel.server.proc.poll() is None


FLOOD = """
import socket, sys, time
relay = (sys.argv[1], int(sys.argv[2]))
packet = bytes.fromhex(sys.argv[3]) + b"f" * 1200
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
end = time.time() + float(sys.argv[4])
while time.time() < end:
    for _ in range(256):
        try:
            u.sendto(packet, relay)
            sent += 1
        except OSError:
            pass
print(sent)
"""


def test_an_unpaced_udp_flood_leaves_tcp_its_share_and_its_drops_are_counted(tunnel, target):
    """A sender that does not pace itself at all (a process of its own, as fast as Python sends): the relay
    reads only what the tunnel takes (datagram credit), the kernel drops the rest at the relay socket, and a
    TCP download beside it keeps a fair part of its solo speed. The drops appear in the client's log line for
    the association."""
    tunnel.start()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    received = [0]

    def drain():
        while True:
            try:
                sink.recv(65535)
            except OSError:
                return
            received[0] += 1

    threading.Thread(target=drain, daemon=True).start()

    def download():
        return timed_download(tunnel.socks_port, target.port, 256 << 20)

    solo = download()
    control, relay = associate(tunnel.socks_port)
    header = udp_header("127.0.0.1", sink.getsockname()[1]).hex()
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, relay[0], str(relay[1]), header, "30"], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.5)
        beside = download()
    finally:
        flood.terminate()
        out, _ = flood.communicate(timeout=10)
    time.sleep(0.3)
    control.close()
    sink.close()
    assert received[0] > 1000, "datagrams of the flood went through"
    # Before datagram credit and read gating: 6-10% (the flood's records queued megabytes ahead of the
    # download's window updates). Measured after: 40-50% with a faster flood (tunnel-bench --only flood).
    assert beside > solo * 0.2, (beside, solo)
    assert harness.wait_for(lambda: "UDP association ended" in tunnel.client.stderr_text(), timeout=10)
    line = next(l for l in tunnel.client.stderr_text().splitlines() if "UDP association ended" in l)
    match = re.search(r"(\d+) datagrams sent, \d+ received, (\d+) dropped \((\d+) of them by the kernel", line)
    assert match, line
    sent, dropped, by_kernel = map(int, match.groups())
    assert sent > 1000 and by_kernel > 0 and dropped >= by_kernel, line
    assert tunnel.client.proc.poll() is None and tunnel.server.proc.poll() is None


def test_udp_can_be_disabled(tunnel, tmp_path):
    config = tmp_path / "client.toml"
    config.write_text("udp = false\n")
    tunnel.start(client_config=str(config))
    control = socket.create_connection(("127.0.0.1", tunnel.socks_port), timeout=10)
    control.sendall(b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert recv_exact(control, 2) == b"\x05\x00"
    rep, _, _ = harness.read_socks5_reply(control)
    assert rep == 0x07
    control.close()


@pytest.mark.parametrize("direction", ["app-to-server", "server-to-app"])
def test_a_datagram_too_large_for_one_record_is_dropped_and_the_tunnel_goes_on(tunnel, dns, target, direction):
    """A datagram that does not fit one record (a 65,507-byte SOCKS5 datagram from the app, a 65,500-byte reply
    from a UDP server) is dropped; everything after it in that direction still goes: a CONNECT is answered at
    once and small datagrams still travel. (It used to sit at the head of the queue for ever and freeze the
    tunnel: no open result, no window update, no ping answer.)"""
    tunnel.start()
    control, relay = associate(tunnel.socks_port)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    header = udp_header("127.0.0.1", dns.port)
    if direction == "app-to-server":
        u.sendto(header + b"x" * (65507 - len(header)), relay)   # the largest UDP datagram over IPv4
    else:
        u.sendto(header + b"BIG 65500", relay)
    time.sleep(0.5)
    started = time.time()
    s, rep, _, _ = harness.socks5_request(tunnel.socks_port, "127.0.0.1", target.port, timeout=5)
    assert rep == 0
    s.sendall(b"ECHO\nhello")
    assert recv_exact(s, 5) == b"hello"
    assert time.time() - started < 3, "the CONNECT waited behind the large datagram"
    s.close()
    u.sendto(header + b"small", relay)
    host, port, data = parse_reply(u.recvfrom(65535)[0])
    assert data == b"echo:small"
    # The largest datagram that fits one record still goes through whole, both ways.
    u.sendto(header + b"BIG 65490", relay)
    assert parse_reply(u.recvfrom(65535)[0])[2] == b"B" * 65490
    u.close()
    control.close()


def test_only_addresses_the_association_sent_to_may_answer(tunnel, dns):
    """The server's relay is not full-cone: a datagram to its UDP socket from an address the association never
    sent to is dropped (RFC 4787 address-dependent filtering); once the client sends there, it may answer."""
    import subprocess
    tunnel.start()
    control, relay = associate(tunnel.socks_port)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(udp_header("127.0.0.1", dns.port) + b"hello", relay)
    assert parse_reply(u.recvfrom(65535)[0])[2] == b"echo:hello"
    # The server's relay socket (IPv4) for this association.
    out = subprocess.run(["ss", "-Huanp"], capture_output=True, text=True).stdout
    ports = [int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines()
             if f"pid={tunnel.server.proc.pid}," in line and line.split()[3].startswith("0.0.0.0:")]
    assert ports, out
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.2", 0))
    for port in ports:
        stranger.sendto(b"unsolicited", ("127.0.0.1", port))
    u.settimeout(1.5)
    with pytest.raises(socket.timeout):
        while True:
            host, _, data = parse_reply(u.recvfrom(65535)[0])
            assert host != "127.0.0.2", f"a stranger's datagram reached the application: {data!r}"
    # After the application sent to it, that address may answer.
    u.sendto(udp_header("127.0.0.2", stranger.getsockname()[1]) + b"now you may", relay)
    stranger.settimeout(5)
    data, source = stranger.recvfrom(65535)
    assert data == b"now you may"
    stranger.sendto(b"answer", source)
    u.settimeout(5)
    host, port, data = parse_reply(u.recvfrom(65535)[0])
    assert (host, data) == ("127.0.0.2", b"answer")
    stranger.close()
    u.close()
    control.close()
