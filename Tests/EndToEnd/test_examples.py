"""The example scripts the README sends a new user to: they must keep working as the product changes (the
full-tunnel one once stopped reaching its web host when the server began denying private ranges)."""

import os
import subprocess

import pytest

import harness
from conftest import have_root_netns


def run_example(name, timeout=600):
    script = os.path.join(harness.ROOT, "Examples", name, "run.sh")
    return subprocess.run(["bash", script], capture_output=True, text=True, timeout=timeout)


def test_socks_over_loopback_fetches_its_page():
    out = run_example("socks-over-loopback")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Hello through the encrypted tunnel" in out.stdout
    assert "OK: the page above came through" in out.stdout


@pytest.mark.skipif(not have_root_netns(), reason="needs root and `ip netns` (network namespaces)")
@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun")
def test_full_tunnel_in_namespaces_reaches_the_web_host_and_restores_the_laptop():
    out = run_example("full-tunnel-netns")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("hello from the web host, through the tunnel") == 2, out.stdout[-3000:]
    assert "0% packet loss" in out.stdout
    after = out.stdout.split("everything comes back")[-1]
    assert "nameserver 10.230.1.1" in after and "0.0.0.0/1" not in after, after


@pytest.mark.skipif(not have_root_netns(), reason="needs root and `ip netns` (network namespaces)")
def test_ha_netns_clients_move_off_a_killed_and_a_drained_server_behind_haproxy():
    """Examples/ha-netns: three servers behind HAProxy (Debian's, TCP mode, Examples/ha-netns/haproxy.cfg), two
    clients each fetching a page every 50 ms. One server is killed: its client's next good request comes within
    2 s. Another drains (SIGTERM): its client moves with no failed request."""
    out = run_example("ha-netns")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    print(out.stdout[-1500:])
    kill = int(out.stdout.split("kill_to_first_good_ms=")[1].split()[0])
    assert kill <= 2000
    assert "RESULT drain_failed=0 " in out.stdout
    assert "OK: clients moved off a killed and a drained server" in out.stdout
