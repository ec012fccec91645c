"""The server's destination policy: by default it reaches neither its own loopback, link-local (cloud metadata),
private and unique-local networks, nor the unspecified addresses or its own interfaces, over every way a client
can ask (SOCKS5 by address and by name, SOCKS4/4a, HTTP CONNECT, absolute-URI HTTP, UDP ASSOCIATE); `--allow`
opens a range."""

import socket
import struct
import subprocess

import pytest

import harness
from harness import recv_exact, socks5_request
from test_udp import associate, dns, parse_reply, udp_header  # noqa: F401 (dns is a fixture)

NOT_ALLOWED = 0x02


def socks4(port, host, target_port, name=None):
    """SOCKS4 (or 4a with `name`) CONNECT; returns the reply code (0x5A granted, 0x5B refused)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    address = socket.inet_aton("0.0.0.1") if name else socket.inet_aton(host)
    s.sendall(b"\x04\x01" + struct.pack(">H", target_port) + address + b"user\x00" + (name.encode() + b"\x00" if name else b""))
    reply = recv_exact(s, 8)
    s.close()
    return reply[1]


def curl(*args):
    return subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "15", *args],
                          capture_output=True, text=True)


def socks5_reply(port, host, target_port):
    s, rep, _, _ = socks5_request(port, host, target_port)
    s.close()
    return rep


# Every way to spell "this host": loopback by address and name, the unspecified addresses (Linux delivers a
# connect to them locally), and IPv4 inside IPv6 (mapped, NAT64, 6to4).
THIS_HOST = ["127.0.0.1", "localhost", "127.1", "0.0.0.0", "0", "::", "::1", "::ffff:127.0.0.1", "::ffff:0.0.0.0",
             "64:ff9b::7f00:1", "2002:7f00:1::1"]


@pytest.mark.parametrize("host", THIS_HOST)
def test_by_default_no_way_reaches_the_servers_own_services(tunnel, origin, host):
    tunnel.start(allow=())
    port = tunnel.socks_port
    assert socks5_reply(port, host, origin.port) == NOT_ALLOWED
    bracketed = f"[{host}]" if ":" in host else host
    assert curl("--proxy", f"http://127.0.0.1:{port}", f"http://{bracketed}:{origin.port}/").stdout == "403"
    assert curl("-p", "--proxy", f"http://127.0.0.1:{port}", f"http://{bracketed}:{origin.port}/").stdout in ("000", "403")
    if ":" not in host:
        assert socks4(port, None, origin.port, name=host) == 0x5B
    assert "destination denied by policy" in tunnel.server.stderr_text()


@pytest.mark.parametrize("host", ["169.254.169.254", "10.1.2.3", "192.168.1.1", "172.16.0.1", "100.64.0.1",
                                  "fd00::1", "fe80::1"])
def test_by_default_link_local_and_private_networks_are_refused(tunnel, host):
    tunnel.start(allow=())
    assert socks5_reply(tunnel.socks_port, host, 80) == NOT_ALLOWED
    if ":" not in host:
        assert socks4(tunnel.socks_port, host, 80) == 0x5B


def test_the_unspecified_address_stays_refused_when_loopback_is_allowed(tunnel, origin):
    tunnel.start()  # --allow 127.0.0.0/8 --allow ::1/128, as the loopback example passes
    port = tunnel.socks_port
    assert socks5_reply(port, "127.0.0.1", origin.port) == 0x00
    for host in ("0.0.0.0", "0", "::", "::ffff:0.0.0.0"):
        assert socks5_reply(port, host, origin.port) == NOT_ALLOWED, host
    assert curl("--proxy", f"http://127.0.0.1:{port}", f"http://0.0.0.0:{origin.port}/").stdout == "403"
    assert curl("-p", "--proxy", f"http://127.0.0.1:{port}", f"http://[::]:{origin.port}/").stdout in ("000", "403")
    assert curl("--proxy", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{origin.port}/").stdout == "200"


def test_allow_opens_a_range(tunnel, origin):
    tunnel.start(allow=("127.0.0.0/8",))
    port = tunnel.socks_port
    assert socks5_reply(port, "127.0.0.1", origin.port) == 0x00
    assert socks4(port, "127.0.0.1", origin.port) == 0x5A
    assert curl("--proxy", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{origin.port}/").stdout == "200"
    assert socks5_reply(port, "::1", origin.port) == NOT_ALLOWED, "only the allowed range"
    assert socks5_reply(port, "10.1.2.3", 80) == NOT_ALLOWED


def test_a_more_specific_deny_beats_allow(tunnel, origin, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('deny = ["127.0.0.2/32"]\nallow = ["127.0.0.0/8"]\n')
    tunnel.start(server_config=str(config), allow=())
    assert socks5_reply(tunnel.socks_port, "127.0.0.1", origin.port) == 0x00
    assert socks5_reply(tunnel.socks_port, "127.0.0.2", origin.port) == NOT_ALLOWED


@pytest.mark.parametrize("allow", [(), ("127.0.0.0/8", "::1/128")])
def test_udp_to_the_unspecified_address_and_loopback(tunnel, dns, allow):
    tunnel.start(allow=allow)
    control, relay = associate(tunnel.socks_port)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(1.5)
    for host in ("0.0.0.0", "::", "0"):
        u.sendto(udp_header(host, dns.port) + b"leak", relay)
    if not allow:
        u.sendto(udp_header("127.0.0.1", dns.port) + b"leak", relay)
        u.sendto(udp_header("localhost", dns.port) + b"leak", relay)
    with pytest.raises(socket.timeout):
        u.recvfrom(65535)
    assert dns.seen == [], "a datagram reached a loopback-only service"
    if allow:
        u.settimeout(5)
        u.sendto(udp_header("127.0.0.1", dns.port) + b"ok", relay)
        assert parse_reply(u.recvfrom(65535)[0])[2] == b"echo:ok"
    u.close()
    control.close()
