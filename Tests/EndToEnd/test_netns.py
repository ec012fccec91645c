"""Reply codes that need a network of their own: unreachable networks and hosts, and connect timeouts.

Both ends run inside a network namespace made (and removed) by this module, so no packet leaves it:
- 10.97.0.0/16 has no route at all                  -> ENETUNREACH  -> reply 0x03
- 10.98.0.0/16 has an `unreachable` route            -> EHOSTUNREACH -> reply 0x04
- 10.99.0.2 sits behind a veth whose far end ignores it -> no answer -> reply 0x06 after connect_timeout
"""

import os
import subprocess
import sys
import time

import pytest

from conftest import have_root_netns

pytestmark = pytest.mark.skipif(not have_root_netns(), reason="needs root and `ip netns` (network namespaces)")

HERE = os.path.dirname(os.path.abspath(__file__))


def sh(*args):
    subprocess.run(list(args), check=True, capture_output=True)


@pytest.fixture(scope="module")
def netns():
    name = f"tnltest{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        ex = ["ip", "netns", "exec", name]
        sh(*ex, "ip", "link", "set", "lo", "up")
        # A veth pair whose far end has no address: SYNs to 10.99.0.2 go out and are never answered.
        sh(*ex, "ip", "link", "add", "blackhole0", "type", "veth", "peer", "name", "blackhole1")
        sh(*ex, "ip", "addr", "add", "10.99.0.1/24", "dev", "blackhole0")
        sh(*ex, "ip", "link", "set", "blackhole0", "up")
        sh(*ex, "ip", "link", "set", "blackhole1", "up")
        sh(*ex, "ip", "neigh", "add", "10.99.0.2", "lladdr", "02:00:00:00:00:02", "dev", "blackhole0", "nud", "permanent")
        sh(*ex, "ip", "route", "add", "unreachable", "10.98.0.0/16")
        # An address of the server host's own that is in no denied range (as a public address on eth0 is).
        sh(*ex, "ip", "addr", "add", "198.51.100.7/32", "dev", "blackhole0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def probe(netns, proxy_port, host, port):
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, os.path.join(HERE, "socks_probe.py"),
                          str(proxy_port), host, str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.fixture
def ns_tunnel(tunnel, netns, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('connect_timeout = "1500ms"\n')
    # The unroutable ranges below are private: open them (the server denies them by default).
    tunnel.start_server(config=str(config), netns=netns, allow=("10.96.0.0/12", "127.0.0.0/8"))
    client_args = ["--server", tunnel.server.address, "--server-key", tunnel.server_pub, "--key", tunnel.client_key,
                   "--socks", "127.0.0.1:0", "--log-level", "debug"]
    import harness
    tunnel.client = harness.Process([harness.CLIENT_BIN] + client_args, r"SOCKS5 listening on (\S+)",
                                    str(tmp_path / "client.log"), netns=netns)
    tunnel.processes.append(tunnel.client)
    tunnel.wait_until_connected()
    return tunnel


def test_network_unreachable(ns_tunnel, netns):
    assert probe(netns, ns_tunnel.socks_port, "10.97.1.1", 80) == 0x03


def test_host_unreachable(ns_tunnel, netns):
    assert probe(netns, ns_tunnel.socks_port, "10.98.1.1", 80) == 0x04


def test_connect_timeout_is_ttl_expired(ns_tunnel, netns):
    start = time.time()
    assert probe(netns, ns_tunnel.socks_port, "10.99.0.2", 80) == 0x06
    assert 1.0 < time.time() - start < 10


def test_ipv6_without_route_is_network_unreachable(ns_tunnel, netns):
    assert probe(netns, ns_tunnel.socks_port, "2001:db8::1", 80) in (0x03, 0x04)


def http_probe(netns, proxy_port, request):
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, os.path.join(HERE, "http_probe.py"),
                          str(proxy_port), request], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_http_proxy_timeout_is_504_and_unreachable_is_502(ns_tunnel, netns):
    assert http_probe(netns, ns_tunnel.socks_port, "CONNECT 10.99.0.2:443 HTTP/1.1\\r\\n\\r\\n").startswith("HTTP/1.1 504")
    assert http_probe(netns, ns_tunnel.socks_port,
                      "GET http://10.99.0.2/ HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n").startswith("HTTP/1.1 504")
    assert http_probe(netns, ns_tunnel.socks_port, "CONNECT 10.97.1.1:443 HTTP/1.1\\r\\n\\r\\n").startswith("HTTP/1.1 502")


def test_the_servers_own_addresses_are_refused_also_when_added_later(ns_tunnel, netns):
    """A service listening on the server's own (non-loopback, non-private) address is not reachable through the
    proxy, nor through an address the host gains while the server runs."""
    ex = ["ip", "netns", "exec", netns]
    service = subprocess.Popen([*ex, sys.executable, "-c", "import socket,time\n"
                                "s=socket.socket(); s.bind(('0.0.0.0', 8099)); s.listen(); time.sleep(60)"])
    try:
        time.sleep(0.3)
        assert probe(netns, ns_tunnel.socks_port, "198.51.100.7", 8099) == 0x02
        assert probe(netns, ns_tunnel.socks_port, "127.0.0.1", 8099) == 0x00, "allowed loopback, for contrast"
        sh(*ex, "ip", "addr", "add", "198.51.100.8/32", "dev", "blackhole0")
        assert probe(netns, ns_tunnel.socks_port, "198.51.100.8", 8099) == 0x02
        assert "an address of the server itself" in ns_tunnel.server.stderr_text()
    finally:
        service.kill()
        subprocess.run([*ex, "ip", "addr", "del", "198.51.100.8/32", "dev", "blackhole0"], capture_output=True)
