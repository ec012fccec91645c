"""Full-tunnel mode (tunnel-client --full-tunnel, tunnel-server --tun) on real TUN devices, in network
namespaces this module makes and removes:

    client (ftc) --veth 10.231.1.0/24, fd31:1::/64-- server (fts) --veth 10.231.2.0/24, fd31:2::/64-- web (ftw)
    client2 (ftd) --veth 10.231.3.0/24-------------/

The web host has no route to the client networks: it is reachable from the clients only through the server's
NAT, so anything that works from the client went through the tunnel. A capture on the client's outside
interface shows what left the client host. DNS: a small server on the web host answers for web.test; the
server host's resolver points at it, the client host's at an address where nothing answers.
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import harness
from conftest import have_root_netns
from harness import CLIENT_BIN, SERVER_BIN, Process, keygen

HERE = os.path.dirname(os.path.abspath(__file__))


def have_tun():
    return os.path.exists("/dev/net/tun")


def missing_tools():
    return [tool for tool in ("nft", "tcpdump", "iperf3", "ping", "curl") if shutil.which(tool) is None]


pytestmark = [
    pytest.mark.skipif(not have_root_netns(), reason="needs root and `ip netns` (network namespaces)"),
    pytest.mark.skipif(not have_tun(), reason="needs /dev/net/tun (TUN devices)"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} (Tests/install-deps.sh)"),
]

PID = os.getpid() % 100000
NS_C, NS_S, NS_W, NS_D = f"ftc{PID}", f"fts{PID}", f"ftw{PID}", f"ftd{PID}"
WEB4, WEB6 = "10.231.2.2", "fd31:2::2"
SERVER_C, SERVER_D = "10.231.1.1", "10.231.3.1"
PORT = 7443
PORT_NO_V6 = 7444


def sh(*args, check=True, timeout=30):
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stdout}{out.stderr}")
    return out


def ns(name, *args, **kwargs):
    return sh("ip", "netns", "exec", name, *args, **kwargs)


def host_state(name):
    """Everything full-tunnel mode may touch on a client host."""
    return {
        "routes4": ns(name, "ip", "-4", "route", "show", "table", "all").stdout,
        "routes6": ns(name, "ip", "-6", "route", "show", "table", "main").stdout,
        "rules": ns(name, "ip", "rule").stdout,
        "resolv": ns(name, "cat", "/etc/resolv.conf").stdout,
        "nft": ns(name, "nft", "list", "ruleset").stdout,
        "links": re.sub(r"\d+: ", "", "\n".join(sorted(
            line.split("@")[0] for line in ns(name, "ip", "-o", "link").stdout.splitlines()))),
    }


class Network:
    def __init__(self, directory):
        self.dir = directory
        self.processes = []
        self.server_key = os.path.join(directory, "server.key")
        self.server_pub = keygen(SERVER_BIN, self.server_key)
        self.keys = {}
        for name in ("c1", "c2", "peer"):
            path = os.path.join(directory, f"{name}.key")
            self.keys[name] = (path, keygen(CLIENT_BIN, path))
        self.authorized = os.path.join(directory, "authorized_keys")
        with open(self.authorized, "w") as f:
            for name, (_, pub) in self.keys.items():
                f.write(f"{pub} {name}\n")

    def build(self):
        for name in (NS_C, NS_S, NS_W, NS_D):
            sh("ip", "netns", "add", name)
            ns(name, "ip", "link", "set", "lo", "up")
        resolvers = {NS_C: SERVER_C, NS_S: WEB4, NS_D: SERVER_D, NS_W: WEB4}
        for name, resolver in resolvers.items():
            os.makedirs(f"/etc/netns/{name}", exist_ok=True)
            with open(f"/etc/netns/{name}/resolv.conf", "w") as f:
                f.write(f"# test resolver of {name}\nnameserver {resolver}\nsearch test\n")
        links = [
            (NS_S, "s0", NS_C, "c0", "10.231.1", "fd31:1::"),
            (NS_S, "s1", NS_W, "w0", "10.231.2", "fd31:2::"),
            (NS_S, "s2", NS_D, "d0", "10.231.3", "fd31:3::"),
        ]
        for near, near_if, far, far_if, v4, v6 in links:
            sh("ip", "-n", near, "link", "add", near_if, "type", "veth", "peer", "name", far_if, "netns", far)
            sh("ip", "-n", near, "addr", "add", f"{v4}.1/24", "dev", near_if)
            sh("ip", "-n", far, "addr", "add", f"{v4}.2/24", "dev", far_if)
            sh("ip", "-n", near, "-6", "addr", "add", f"{v6}1/64", "dev", near_if, "nodad")
            sh("ip", "-n", far, "-6", "addr", "add", f"{v6}2/64", "dev", far_if, "nodad")
            sh("ip", "-n", near, "link", "set", near_if, "up")
            sh("ip", "-n", far, "link", "set", far_if, "up")
        # The client hosts' own default routes lead to the server host (their "ISP"); the web host has none.
        sh("ip", "-n", NS_C, "route", "add", "default", "via", SERVER_C)
        sh("ip", "-n", NS_C, "-6", "route", "add", "default", "via", "fd31:1::1")
        sh("ip", "-n", NS_D, "route", "add", "default", "via", SERVER_D)
        sh("ip", "-n", NS_D, "-6", "route", "add", "default", "via", "fd31:3::1")

        www = os.path.join(self.dir, "www")
        os.makedirs(www)
        with open(os.path.join(www, "hello.txt"), "w") as f:
            f.write("hello through the tunnel\n")
        with open(os.path.join(www, "big.bin"), "wb") as f:
            f.write(os.urandom(4 << 20))
        with open(os.path.join(www, "large.bin"), "wb") as f:
            f.write(os.urandom(32 << 20))
        self.start("web", NS_W, [sys.executable, "-m", "http.server", "--bind", "::", "--directory", www, "8080"],
                   r"Serving HTTP on (\S+)", stream="stdout")
        self.start("dns", NS_W, [sys.executable, os.path.join(HERE, "dns_server.py"), WEB4, f"web.test={WEB4},{WEB6}"],
                   r"(dns ready)", stream="stdout")
        self.server = self.start_server(PORT, [])

    def start(self, label, netns, args, ready, stream="stderr"):
        log = os.path.join(self.dir, f"{label}.log")
        if stream == "stdout":
            # Readiness on stdout: Process reads it there; stderr goes to the log.
            process = Process(args, ready, log, netns=netns, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        else:
            process = Process(args, ready, log, netns=netns)
        self.processes.append(process)
        return process

    def start_server(self, port, extra, label="server"):
        return self.start(label, NS_S, [SERVER_BIN, "--listen", f"0.0.0.0:{port}", "--key", self.server_key,
                                        "--authorized-keys", self.authorized, "--tun", "--log-level", "debug",
                                        # the web host is on private ranges, which the server denies by default
                                        "--allow", "10.231.2.0/24", "--allow", "fd31:2::/64", *extra],
                          r"tunnel-server listening on (\S+)")

    def start_client(self, netns, key, server, port=PORT, extra=(), label="client"):
        args = [CLIENT_BIN, "--server", f"{server}:{port}", "--server-key", self.server_pub, "--key", self.keys[key][0],
                "--socks", "127.0.0.1:1080", "--full-tunnel", "--log-level", "debug", *extra]
        client = self.start(label, netns, args, r"SOCKS5 listening on (\S+)")
        ok = harness.wait_for(lambda: "full tunnel up" in client.stderr_text() or client.proc.poll() is not None,
                              timeout=20)
        assert ok and client.proc.poll() is None, "full tunnel did not come up:\n" + client.stderr_text()
        return client

    def logs(self):
        return "\n".join(f"--- {' '.join(p.args[:2])} ---\n{p.stderr_text()[-5000:]}" for p in self.processes)

    def teardown(self):
        for p in reversed(self.processes):
            p.kill()
        for name in (NS_C, NS_S, NS_W, NS_D):
            forget_state_files(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def forget_state_files(name):
    """Removes the crash journals and locks of namespace `name` (about to be deleted) from /var/lib."""
    try:
        inode = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return
    for directory in ("/var/lib/tunnel-client", "/var/lib/tunnel-server"):
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(f"netns-{inode}.") or entry.startswith(f"netns-{inode}-"):
                os.unlink(os.path.join(directory, entry))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    network = Network(str(tmp_path_factory.mktemp("fulltunnel")))
    try:
        network.build()
        yield network
    except Exception:
        print(network.logs())
        raise
    finally:
        network.teardown()


@pytest.fixture
def dump_logs_on_failure(net, request):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(net.logs())


class Capture:
    """tcpdump on an interface of a namespace, for leak checks."""

    def __init__(self, netns, interface, path):
        self.path = path
        self.log = open(path + ".log", "wb")
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", interface, "-n", "-U", "-w", path],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        assert harness.wait_for(lambda: b"listening on" in open(path + ".log", "rb").read(), timeout=10), "tcpdump did not start"

    def stop(self):
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        self.log.close()
        out = sh("tcpdump", "-r", self.path, "-n", "ip or ip6")
        return [line for line in out.stdout.splitlines() if line.strip()]


def is_link_chatter(line):
    """IPv6 neighbour discovery and MLD: link-local housekeeping of the interface itself, not user traffic."""
    return "ICMP6, neighbor" in line or "ICMP6, router solicitation" in line or "ICMP6, multicast listener" in line \
        or " > ff02::" in line


def curl(netns, url, *extra, timeout=20):
    return ns(netns, "curl", "-sS", "--max-time", str(timeout), *extra, url, check=False, timeout=timeout + 10)


def test_full_tunnel_carries_everything_without_leaks_and_restores_the_host(net, dump_logs_on_failure, tmp_path):
    before = host_state(NS_C)
    # Without the tunnel the web host is unreachable from the client host (no route back from it).
    assert curl(NS_C, f"http://{WEB4}:8080/hello.txt", timeout=3).returncode != 0
    # The server's DNS forwarder answers only what comes through the tunnel, not its other interfaces.
    for transport in ("udp", "tcp"):
        answer = ns(NS_C, sys.executable, os.path.join(HERE, "dns_query.py"), "10.77.0.1", "web.test", transport, "1.5", check=False)
        assert answer.returncode != 0 and WEB4 not in answer.stdout, transport

    client = net.start_client(NS_C, "c1", SERVER_C)
    capture = Capture(NS_C, "c0", str(tmp_path / "c0.pcap"))
    try:
        devices = re.findall(r"full tunnel up on (\S+): (\S+)/24 and (\S+)/64", client.stderr_text())
        assert devices, client.stderr_text()
        device, address4, address6 = devices[0]
        assert address4.startswith("10.77.0.") and address6.startswith("fd")
        routes = ns(NS_C, "ip", "route").stdout
        assert f"0.0.0.0/1 dev {device}" in routes and f"128.0.0.0/1 dev {device}" in routes
        assert f"{SERVER_C} via" in routes or f"{SERVER_C} dev c0" in routes
        assert "default via 10.231.1.1" in routes, "the original default route must stay"
        assert ns(NS_C, "ip", "-6", "route", "get", WEB6).stdout.split(" dev ")[1].split()[0] == device

        # ICMP both families.
        ping = ns(NS_C, "ping", "-c", "3", "-i", "0.2", "-W", "2", WEB4, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        ping6 = ns(NS_C, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", WEB6, check=False)
        assert ping6.returncode == 0, ping6.stdout + ping6.stderr

        # TCP both families.
        out = curl(NS_C, f"http://{WEB4}:8080/hello.txt")
        assert out.returncode == 0 and out.stdout == "hello through the tunnel\n", out.stderr
        out = curl(NS_C, f"http://[{WEB6}]:8080/hello.txt")
        assert out.returncode == 0 and out.stdout == "hello through the tunnel\n", out.stderr

        # DNS: the resolver now points through the tunnel, and names resolve there.
        resolv = ns(NS_C, "cat", "/etc/resolv.conf").stdout
        assert "nameserver 10.77.0.1" in resolv and SERVER_C not in resolv, resolv
        assert "search test" in resolv
        hosts = ns(NS_C, "getent", "ahostsv4", "web.test", check=False)
        assert WEB4 in hosts.stdout, hosts.stdout + hosts.stderr
        # Over TCP too (what resolvers fall back to for answers too large for UDP).
        for transport in ("udp", "tcp"):
            answer = ns(NS_C, sys.executable, os.path.join(HERE, "dns_query.py"), "10.77.0.1", "web.test", transport, check=False)
            assert answer.stdout.split() == [WEB4], transport + ": " + answer.stdout + answer.stderr
        out = curl(NS_C, "http://web.test:8080/hello.txt")
        assert out.returncode == 0 and out.stdout == "hello through the tunnel\n", out.stderr
        # A whole file arrives intact.
        out = ns(NS_C, "sh", "-c", f"curl -sS --max-time 30 http://{WEB4}:8080/big.bin | sha256sum", check=False)
        expected = sh("sha256sum", os.path.join(net.dir, "www", "big.bin")).stdout.split()[0]
        assert out.stdout.split()[0] == expected

        # iperf3 through the tunnel, both directions.
        iperf_server = net.start("iperf", NS_W, ["iperf3", "-s", "-B", WEB4, "-p", "5201"], None)
        time.sleep(0.5)
        for reverse in ([], ["-R"]):
            out = ns(NS_C, "iperf3", "-c", WEB4, "-p", "5201", "-t", "2", "-J", *reverse, check=False, timeout=60)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr
            import json
            received = json.loads(out.stdout)["end"]["sum_received"]["bytes"]
            assert received > 1 << 20, f"iperf3 moved only {received} bytes"
        iperf_server.kill()

        # SOCKS keeps working beside the full tunnel.
        out = curl(NS_C, "http://web.test:8080/hello.txt", "--socks5-hostname", "127.0.0.1:1080")
        assert out.returncode == 0 and out.stdout == "hello through the tunnel\n", out.stderr
    finally:
        lines = capture.stop()

    # Only the tunnel's own TCP connection left the client host, IPv6 included.
    tunnel_flow = re.compile(rf"IP 10\.231\.1\.2\.\d+ > {re.escape(SERVER_C)}\.{PORT}:|IP {re.escape(SERVER_C)}\.{PORT} > 10\.231\.1\.2\.\d+:")
    assert any(tunnel_flow.search(line) for line in lines), "the capture saw no tunnel traffic at all"
    leaks = [line for line in lines if not tunnel_flow.search(line) and not is_link_chatter(line)]
    assert leaks == [], "traffic left outside the tunnel:\n" + "\n".join(leaks[:20])

    # A clean exit puts back exactly what was there.
    assert client.terminate() == 0, client.stderr_text()
    assert host_state(NS_C) == before


def test_restart_after_a_crash_undoes_the_previous_runs_changes(net, dump_logs_on_failure):
    before = host_state(NS_C)
    client = net.start_client(NS_C, "c1", SERVER_C, label="client-crash")
    assert "10.77.0.1" in ns(NS_C, "cat", "/etc/resolv.conf").stdout
    client.proc.kill()  # SIGKILL: no cleanup at all
    client.proc.wait(timeout=10)
    client.log.close()
    assert "10.77.0.1" in ns(NS_C, "cat", "/etc/resolv.conf").stdout, "the crash should have left the resolver changed"
    assert host_state(NS_C) != before

    client = net.start_client(NS_C, "c1", SERVER_C, label="client-recover")
    assert "undid" in client.stderr_text() and "left by a previous run" in client.stderr_text()
    out = curl(NS_C, f"http://{WEB4}:8080/hello.txt")
    assert out.returncode == 0, out.stderr
    assert client.terminate() == 0
    assert host_state(NS_C) == before


def test_clients_get_their_own_addresses_and_cannot_spoof_each_other(net, dump_logs_on_failure, tmp_path):
    first = net.start_client(NS_C, "c1", SERVER_C, label="client-first")
    try:
        first_address = re.findall(r"full tunnel up on \S+: (\S+)/24", first.stderr_text())[0]
        second = net.start_client(NS_D, "c2", SERVER_D, label="client-second")
        second_address = re.findall(r"full tunnel up on \S+: (\S+)/24", second.stderr_text())[0]
        assert second_address != first_address
        assert ns(NS_D, "ping", "-c", "2", "-i", "0.2", "-W", "2", WEB4, check=False).returncode == 0
        second.terminate()

        # A hostile client (its own Noise implementation, so no client-side filter) sends one packet from its
        # own address and one claiming the first client's. Only the first may reach the server's network.
        device = re.findall(r"full tunnel on (\S+):", net.server.stderr_text())[0]
        capture = Capture(NS_S, device, str(tmp_path / "server-tun.pcap"))
        peer, assigned, replies = hostile_peer(net, NS_D, SERVER_D, [(None, 0x1111), (first_address, 0x2222)])
        lines = capture.stop()
        assert assigned != first_address
        assert any(f"IP {assigned} > {WEB4}: ICMP echo request, id {0x1111}" in line for line in lines), "\n".join(lines)
        assert not any(f"{first_address} > {WEB4}: ICMP echo request, id {0x2222}" in line for line in lines), "\n".join(lines)
        assert replies == [0x1111], replies
        assert harness.wait_for(lambda: f"dropping packets from {first_address}" in net.server.stderr_text(), timeout=5)
        # The first client is unharmed.
        assert ns(NS_C, "ping", "-c", "2", "-i", "0.2", "-W", "2", WEB4, check=False).returncode == 0
    finally:
        first.terminate()


def device_counters(netns, device, direction):
    """(packets, bytes) a device counted in `direction` ("tx": what the kernel handed it, "rx": what was written)."""
    base = f"/sys/class/net/{device}/statistics/{direction}_"
    return int(ns(netns, "cat", base + "packets").stdout), int(ns(netns, "cat", base + "bytes").stdout)


def test_tcp_segments_cross_whole_and_a_client_without_offload_still_gets_plain_packets(net, dump_logs_on_failure):
    """Packet offload (docs/PROTOCOL.md §5.1): with both ends offering it, the server's device hands over TCP
    segments far larger than the MTU and a 32 MiB download arrives intact through them; uploads go the same way.
    While a client without it (the Noise peer, as an older build) is attached, the server turns offload off for
    the whole device: the download is still intact, in packets no larger than the MTU, and the peer gets its
    echo replies. Offload comes back when that client leaves."""
    client = net.start_client(NS_C, "c1", SERVER_C)
    peer = None
    try:
        server_device = re.findall(r"full tunnel on (\S+):", net.server.stderr_text())[0]
        client_device = re.findall(r"full tunnel up on (\S+):", client.stderr_text())[0]
        expected = sh("sha256sum", os.path.join(net.dir, "www", "large.bin")).stdout.split()[0]

        def download():
            before = device_counters(NS_S, server_device, "tx")
            out = ns(NS_C, "sh", "-c", f"curl -sS --max-time 60 http://{WEB4}:8080/large.bin | sha256sum", check=False)
            after = device_counters(NS_S, server_device, "tx")
            assert out.stdout.split()[:1] == [expected], out.stdout + out.stderr
            return (after[1] - before[1]) / max(1, after[0] - before[0])

        average = download()
        assert average > 4000, f"the server's device handed over {average:.0f}-byte packets: no offload"
        iperf_server = net.start("iperf", NS_W, ["iperf3", "-s", "-B", WEB4, "-p", "5202"], None)
        time.sleep(0.5)
        before = device_counters(NS_C, client_device, "tx")
        out = ns(NS_C, "iperf3", "-c", WEB4, "-p", "5202", "-t", "2", "-J", check=False, timeout=60)
        after = device_counters(NS_C, client_device, "tx")
        iperf_server.kill()
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        assert json.loads(out.stdout)["end"]["sum_received"]["bytes"] > 1 << 20
        average = (after[1] - before[1]) / max(1, after[0] - before[0])
        assert average > 4000, f"the client's device handed over {average:.0f}-byte packets for an upload"

        script = os.path.join(HERE, "full_tunnel_peer.py")
        attached = net.server.stderr_text().count(": full tunnel with ")
        gone = net.server.stderr_text().count(" disconnected")
        peer = subprocess.Popen(["ip", "netns", "exec", NS_D, sys.executable, script, f"{SERVER_D}:{PORT}",
                                 harness_key(net.keys["peer"][0]), net.server_pub, WEB4, "-:4660", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert harness.wait_for(lambda: net.server.stderr_text().count(": full tunnel with ") > attached, timeout=10)
        average = download()
        assert average <= 1500, f"{average:.0f}-byte packets went to the device while a client without offload was on"
        peer.terminate()
        out, err = peer.communicate(timeout=10)
        assert "reply 4660" in out, out + err
        peer = None
        assert harness.wait_for(lambda: net.server.stderr_text().count(" disconnected") > gone, timeout=10)
        average = download()
        assert average > 4000, f"offload did not come back: {average:.0f}-byte packets"
    finally:
        if peer is not None:
            peer.kill()
        client.terminate()


def hostile_peer(net, netns, server, packets):
    """Runs full_tunnel_peer.py inside `netns`: returns (None, assigned address, echo reply ids)."""
    script = os.path.join(HERE, "full_tunnel_peer.py")
    spec = ",".join(f"{source or '-'}:{ident}" for source, ident in packets)
    out = ns(netns, sys.executable, script, f"{server}:{PORT}", harness_key(net.keys["peer"][0]), net.server_pub, WEB4,
             spec, check=False, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assigned = re.findall(r"assigned (\S+)", out.stdout)[0]
    replies = [int(x) for x in re.findall(r"reply (\d+)", out.stdout)]
    return None, assigned, replies


def harness_key(path):
    with open(path) as f:
        return f.read().strip()


def test_ipv6_is_blocked_when_the_server_has_no_ipv6_pool(net, dump_logs_on_failure, tmp_path):
    server = net.start_server(PORT_NO_V6, ["--tun-pool", "10.78.0.0/24", "--tun-pool6", "none"], label="server-no-v6")
    before = host_state(NS_C)
    client = net.start_client(NS_C, "c1", SERVER_C, port=PORT_NO_V6, label="client-no-v6")
    capture = Capture(NS_C, "c0", str(tmp_path / "c0-v6.pcap"))
    try:
        assert "IPv6 blocked" in client.stderr_text()
        out = ns(NS_C, "ip", "-6", "route", "get", WEB6, check=False)
        assert out.returncode != 0 or "unreachable" in out.stdout, out.stdout + out.stderr
        assert curl(NS_C, f"http://[{WEB6}]:8080/hello.txt", timeout=5).returncode != 0
        assert ns(NS_C, "ping", "-6", "-c", "1", "-W", "1", WEB6, check=False).returncode != 0
        # IPv4 works.
        out = curl(NS_C, f"http://{WEB4}:8080/hello.txt")
        assert out.returncode == 0, out.stderr
    finally:
        lines = capture.stop()
    leaks = [line for line in lines if line.split(" ")[1:2] == ["IP6"] and not is_link_chatter(line)]
    assert leaks == [], "IPv6 left outside the tunnel:\n" + "\n".join(leaks)
    assert client.terminate() == 0
    assert host_state(NS_C) == before
    server.terminate()


def test_kill_switch_blocks_everything_outside_the_tunnel(net, dump_logs_on_failure, tmp_path):
    before = host_state(NS_C)
    # Something on the server host outside the tunnel port: reachable directly unless the kill switch blocks it.
    other = net.start("other", NS_S, [sys.executable, "-m", "http.server", "--bind", SERVER_C, "8081"],
                      r"Serving HTTP on (\S+)", stream="stdout")
    assert curl(NS_C, f"http://{SERVER_C}:8081/", timeout=5).returncode == 0
    client = net.start_client(NS_C, "c1", SERVER_C, extra=["--kill-switch"], label="client-ks")
    try:
        assert "kill switch on" in client.stderr_text()
        assert curl(NS_C, f"http://{WEB4}:8080/hello.txt").returncode == 0
        assert curl(NS_C, f"http://{SERVER_C}:8081/", timeout=5).returncode != 0
        # The tunnel goes down (server gone): still nothing gets out, and the client keeps trying.
        net.server.terminate()
        assert harness.wait_for(lambda: "tunnel lost" in client.stderr_text() or "peer closed" in client.stderr_text(), timeout=15)
        assert curl(NS_C, f"http://{SERVER_C}:8081/", timeout=3).returncode != 0
        assert ns(NS_C, "ping", "-c", "1", "-W", "1", "10.231.1.1", check=False).returncode != 0
        # Back up: the client reconnects on its own and traffic flows again, with the same address.
        net.server = net.start_server(PORT, [], label="server-again")
        assert harness.wait_for(lambda: client.stderr_text().count("tunnel up to") >= 2, timeout=30), client.stderr_text()
        assert harness.wait_for(lambda: curl(NS_C, f"http://{WEB4}:8080/hello.txt", timeout=3).returncode == 0, timeout=15)
    finally:
        assert client.terminate() == 0
        other.kill()
    assert host_state(NS_C) == before


def test_a_second_full_tunnel_client_refuses_to_start_and_leaves_the_first_alone(net, dump_logs_on_failure, tmp_path):
    """A second `tunnel-client --full-tunnel` on one host (a unit and a manual start) must not take the running
    one's routes, resolver and kill switch for a crash's leftovers: it refuses, and the first keeps working with
    nothing leaving outside the tunnel."""
    before = host_state(NS_C)
    first = net.start_client(NS_C, "c1", SERVER_C, extra=["--kill-switch"], label="client-first")
    try:
        assert harness.wait_for(lambda: "10.77.0.1" in ns(NS_C, "cat", "/etc/resolv.conf").stdout, timeout=10)
        during = host_state(NS_C)
        capture = Capture(NS_C, "c0", str(tmp_path / "c0-second.pcap"))
        try:
            second = ns(NS_C, CLIENT_BIN, "--server", f"{SERVER_C}:{PORT}", "--server-key", net.server_pub,
                        "--key", net.keys["c1"][0], "--socks", "127.0.0.1:1081", "--full-tunnel", "--kill-switch",
                        check=False, timeout=30)
            assert second.returncode != 0
            assert "another tunnel-client --full-tunnel is running" in second.stderr, second.stderr
            assert f"pid {first.proc.pid}" in second.stderr, second.stderr
            assert host_state(NS_C) == during, "the second client changed the host"
            # The first one still carries everything, DNS included.
            assert "10.77.0.1" in ns(NS_C, "cat", "/etc/resolv.conf").stdout
            assert curl(NS_C, "http://web.test:8080/hello.txt").returncode == 0
            assert ns(NS_C, sys.executable, os.path.join(HERE, "dns_query.py"), "10.77.0.1", "web.test", "udp",
                      check=False).returncode == 0
        finally:
            lines = capture.stop()
        tunnel_flow = re.compile(rf"IP 10\.231\.1\.2\.\d+ > {re.escape(SERVER_C)}\.{PORT}:|IP {re.escape(SERVER_C)}\.{PORT} > 10\.231\.1\.2\.\d+:")
        leaks = [line for line in lines if not tunnel_flow.search(line) and not is_link_chatter(line)]
        assert leaks == [], "traffic left outside the tunnel:\n" + "\n".join(leaks[:20])
    finally:
        assert first.terminate() == 0
    assert host_state(NS_C) == before


def test_without_privileges_both_ends_say_what_they_need(net, tmp_path):
    """As an unprivileged user (no CAP_NET_ADMIN), --tun and --full-tunnel fail at once with a clear reason."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    import tempfile
    directory = tempfile.mkdtemp(prefix="tunnel-unpriv-")
    try:
        os.chmod(directory, 0o755)
        for source in (net.server_key, net.keys["c1"][0], net.authorized):
            shutil.copy(source, directory)
            os.chmod(os.path.join(directory, os.path.basename(source)), 0o644)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
        server = ns(NS_S, *nobody, SERVER_BIN, "--listen", "127.0.0.1:0", "--key", f"{directory}/server.key",
                    "--authorized-keys", f"{directory}/authorized_keys", "--tun", check=False)
        assert server.returncode == 1, server.stdout + server.stderr
        assert "needs root or CAP_NET_ADMIN" in server.stderr, server.stderr
        client = ns(NS_C, *nobody, CLIENT_BIN, "--server", f"{SERVER_C}:{PORT}", "--server-key", net.server_pub,
                    "--key", f"{directory}/c1.key", "--socks", "127.0.0.1:0", "--full-tunnel", check=False)
        assert client.returncode == 1, client.stdout + client.stderr
        assert "needs root or CAP_NET_ADMIN" in client.stderr, client.stderr
        assert "cannot listen" not in client.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def netns_inode(name):
    return os.stat(f"/run/netns/{name}").st_ino


def test_a_server_killed_without_cleanup_is_undone_at_its_next_start(net, dump_logs_on_failure):
    """SIGKILL leaves the server's firewall table and ip_forward=1 behind. Its journal lets the next start undo
    them first (so it records forwarding's real original value again), and a clean stop then turns forwarding
    off; --recover-only does the same without starting."""
    name = f"ftk{PID}"
    sh("ip", "netns", "add", name)
    try:
        ns(name, "ip", "link", "set", "lo", "up")
        ns(name, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        ns(name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
        listen = "127.0.0.1:7450"
        args = [SERVER_BIN, "--listen", listen, "--key", net.server_key, "--authorized-keys", net.authorized, "--tun",
                "--tun-pool", "10.79.0.0/24"]

        def forwarding():
            return (ns(name, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip(),
                    ns(name, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip())

        def tables():
            return ns(name, "nft", "list", "tables").stdout

        first = net.start("server-killed", name, args, r"tunnel-server listening on (\S+)")
        assert forwarding() == ("1", "1") and "tunnel_server_" in tables()
        state = f"/var/lib/tunnel-server/netns-{netns_inode(name)}-127.0.0.1-7450.state"
        assert os.path.exists(state) and stat_mode(state) == 0o600
        first.proc.kill()
        first.proc.wait(timeout=10)
        assert forwarding() == ("1", "1") and "tunnel_server_" in tables(), "SIGKILL leaves them behind"

        second = net.start("server-after-kill", name, args, r"tunnel-server listening on (\S+)")
        assert "left by a previous run that did not exit cleanly" in second.stderr_text(), second.stderr_text()
        assert second.terminate() == 0
        assert forwarding() == ("0", "0"), "forwarding is off again after a clean stop"
        assert "tunnel_server_" not in tables() and not os.path.exists(state)

        third = net.start("server-killed-again", name, args, r"tunnel-server listening on (\S+)")
        third.proc.kill()
        third.proc.wait(timeout=10)
        out = ns(name, SERVER_BIN, "--recover-only", "--listen", listen, check=False)
        assert out.returncode == 0 and "left by a previous run" in out.stderr, out.stderr
        assert forwarding() == ("0", "0") and "tunnel_server_" not in tables() and not os.path.exists(state)
    finally:
        forget_state_files(name)
        sh("ip", "netns", "del", name, check=False)


def stat_mode(path):
    import stat as stat_module
    return stat_module.S_IMODE(os.stat(path).st_mode)


def test_a_journal_from_another_namespace_is_not_applied(net, dump_logs_on_failure):
    """Namespaces share /var/lib, and the kernel reuses a dead namespace's inode number for the next one: a
    crashed client's journal must not be run in a new, unrelated namespace that got its number (it used to
    delete that namespace's own routes). The journal says which namespace and boot it belongs to."""
    before = host_state(NS_C)
    client = net.start_client(NS_C, "c1", SERVER_C, label="client-foreign")
    state = f"/var/lib/tunnel-client/netns-{netns_inode(NS_C)}.state"
    assert os.path.exists(state)
    client.proc.kill()
    client.proc.wait(timeout=10)
    commands = [" ".join(bytes.fromhex(word).decode() for word in line.split()[1:])
                for line in open(state).read().splitlines() if line.startswith("cmd ")]
    # The route to the server that the crashed client added, as its journal removes it.
    assert f"ip -4 route del {SERVER_C}/32 dev c0" in commands, commands
    other = f"ftx{PID}"
    sh("ip", "netns", "add", other)
    try:
        # A namespace that looks the same from inside: c0 with the client's address and a host route to the
        # server, which the foreign journal's `ip route del` would take away.
        ns(other, "ip", "link", "set", "lo", "up")
        ns(other, "ip", "link", "add", "c0", "type", "veth", "peer", "name", "c0peer")
        ns(other, "ip", "addr", "add", "10.231.1.2/24", "dev", "c0")
        ns(other, "ip", "link", "set", "c0", "up")
        ns(other, "ip", "link", "set", "c0peer", "up")
        ns(other, "ip", "route", "add", f"{SERVER_C}/32", "dev", "c0")
        routes = ns(other, "ip", "route").stdout
        foreign = f"/var/lib/tunnel-client/netns-{netns_inode(other)}.state"
        shutil.copy(state, foreign)
        os.chmod(foreign, 0o600)
        out = ns(other, CLIENT_BIN, "--recover-only", check=False)
        assert out.returncode == 0, out.stderr
        assert "another network namespace" in out.stderr and "left its" in out.stderr, out.stderr
        assert ns(other, "ip", "route").stdout == routes, "a journal from another namespace changed this one"
        assert not os.path.exists(foreign)
    finally:
        forget_state_files(other)
        sh("ip", "netns", "del", other, check=False)
    # In its own namespace the journal is applied.
    out = ns(NS_C, CLIENT_BIN, "--recover-only", check=False)
    assert out.returncode == 0 and "left by a previous run" in out.stderr, out.stderr
    assert host_state(NS_C) == before


def test_full_tunnel_clients_reach_only_what_the_policy_allows(net, dump_logs_on_failure):
    """The server's destination policy applies to full-tunnel packets as to SOCKS streams: clients reach the
    allowed web network, the DNS forwarder and ping on the gateway, but not the server host's own services,
    its other networks (private ranges), nor the link-local metadata address, in either IP family."""
    # Services a client must not reach: on the server host itself (its gateway address and its address on
    # the client2 link), on a private network behind it (client2's host), and a metadata service.
    net.start("own-service", NS_S, [sys.executable, "-m", "http.server", "--bind", "::", "8082"],
              r"Serving HTTP on (\S+)", stream="stdout")
    net.start("lan-service", NS_D, [sys.executable, "-m", "http.server", "--bind", "::", "8083"],
              r"Serving HTTP on (\S+)", stream="stdout")
    ns(NS_W, "ip", "addr", "add", "169.254.169.254/32", "dev", "w0")
    ns(NS_S, "ip", "route", "add", "169.254.169.254/32", "via", WEB4)
    net.start("metadata", NS_W, [sys.executable, "-m", "http.server", "--bind", "169.254.169.254", "8090"],
              r"Serving HTTP on (\S+)", stream="stdout")
    try:
        # Reachable from the server host itself: only the policy stands in the way.
        assert ns(NS_S, "curl", "-sS", "--max-time", "5", "-o", "/dev/null", "http://169.254.169.254:8090/",
                  check=False).returncode == 0
        client = net.start_client(NS_C, "c1", SERVER_C, label="client-policy")
        try:
            assert curl(NS_C, f"http://{WEB4}:8080/hello.txt").returncode == 0
            assert curl(NS_C, f"http://[{WEB6}]:8080/hello.txt").returncode == 0
            assert ns(NS_C, "ping", "-c", "1", "-W", "2", "10.77.0.1", check=False).returncode == 0
            assert ns(NS_C, "getent", "ahostsv4", "web.test", check=False).returncode == 0
            for url in ("http://10.77.0.1:8082/", "http://10.231.3.1:8082/", "http://[fd31:3::1]:8082/",
                        "http://10.231.3.2:8083/", "http://[fd31:3::2]:8083/", "http://169.254.169.254:8090/",
                        "http://[::ffff:10.231.3.2]:8083/"):
                started = time.monotonic()
                out = curl(NS_C, url, timeout=5)
                assert out.returncode != 0, f"{url} was reachable through the full tunnel"
                # Refused at once (ICMP administratively prohibited), not left to time out.
                assert time.monotonic() - started < 4, f"{url}: {out.stderr}"
            # The same host over SOCKS is refused by the same policy (reply: not allowed).
            out = curl(NS_C, "http://10.231.3.2:8083/", "--socks5", "127.0.0.1:1080", timeout=5)
            assert out.returncode != 0
        finally:
            assert client.terminate() == 0
        table = ns(NS_S, "nft", "list", "table", "inet", "tunnel_server_" + re.findall(r"full tunnel on (\S+):",
                                                                                   net.server.stderr_text())[0])
        assert "ct state invalid drop" in table.stdout and "169.254.0.0/16" in table.stdout, table.stdout
    finally:
        ns(NS_S, "ip", "route", "del", "169.254.169.254/32", check=False)


def test_after_an_outage_the_full_tunnel_is_back_at_once_and_no_pool_address_leaks(net, dump_logs_on_failure, tmp_path):
    """The server is killed mid-transfer and is away for 10 s, long enough for the reconnect backoff to grow
    to several seconds. The apps' packets on the client's TUN device count as someone waiting (as SOCKS
    requests do): the tunnel is back within about a second of the server's return, not at the next backoff
    step. Meanwhile no packet with a pool address as source leaves the server's outside interface (segments
    in flight across the restart are dropped, never forwarded without NAT)."""
    client = net.start_client(NS_C, "c1", SERVER_C, label="client-outage")
    capture = Capture(NS_S, "s1", str(tmp_path / "s1.pcap"))
    pinger = subprocess.Popen(["ip", "netns", "exec", NS_C, "ping", "-i", "0.2", "-W", "1", WEB4],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    download = subprocess.Popen(["ip", "netns", "exec", NS_C, "curl", "-sS", "--max-time", "60", "--limit-rate", "300K",
                                 "-o", "/dev/null", f"http://{WEB4}:8080/big.bin"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        ups = client.stderr_text().count("tunnel up to")
        net.server.proc.kill()
        net.server.proc.wait(timeout=10)
        time.sleep(10)
        net.server = net.start_server(PORT, [], label="server-back")
        back = time.monotonic()
        assert harness.wait_for(lambda: client.stderr_text().count("tunnel up to") > ups, timeout=30), client.stderr_text()
        waited = time.monotonic() - back
        print(f"full tunnel back {waited:.2f} s after the server")
        # At most one second since the last attempt, plus the handshake.
        assert waited < 2.5, f"the full tunnel came back {waited:.1f} s after the server"
        assert harness.wait_for(lambda: curl(NS_C, f"http://{WEB4}:8080/hello.txt", timeout=3).returncode == 0, timeout=10)
        # Segments conntrack cannot place (it marks SYN+FIN invalid, as it does segments of a connection it
        # lost track of) are never NATed: the server must drop them, not forward them with the pool address.
        address = re.findall(r"full tunnel up on \S+: (\S+)/24", client.stderr_text())[0]
        out = ns(NS_C, sys.executable, os.path.join(HERE, "raw_tcp.py"), address, WEB4, "8080", "5", check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        pinger.kill()
        download.kill()
        lines = capture.stop()
        assert client.terminate() == 0
    leaks = [line for line in lines if re.search(r"IP 10\.77\.0\.\d+\.?\d* >", line) or re.search(r"IP6 fd[0-9a-f:]+\.?\d* >", line)]
    assert leaks == [], "pool addresses left the server's outside interface:\n" + "\n".join(leaks[:10])


def test_an_inner_tcp_download_survives_resets_of_the_outer_connection(net, dump_logs_on_failure, tmp_path):
    """A 32 MiB download by an app on the client host (plain curl, no proxy: its packets go into the TUN
    device) while the tunnel's TCP connection is reset three times (`ss -K` in the client's namespace, as a
    NAT or a middlebox would). The client keeps its device and routes, the new connection resumes the session
    and the server routes the same address to it: the app's own TCP connection only sees a few lost segments,
    which it sends again, and the file arrives whole."""
    client = net.start_client(NS_C, "c1", SERVER_C, label="client-reset")
    out = tmp_path / "large.bin"
    download = subprocess.Popen(["ip", "netns", "exec", NS_C, "curl", "-sS", "--max-time", "90", "--limit-rate", "3M",
                                 "-o", str(out), f"http://{WEB4}:8080/large.bin"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for n in range(1, 4):
            assert harness.wait_for(lambda: out.exists() and out.stat().st_size >= n * (7 << 20), timeout=30), \
                "the download stalled"
            ups = client.stderr_text().count("tunnel up to") + client.stderr_text().count("session resumed")
            ns(NS_C, "ss", "-K", "-t", "-n", "dst", SERVER_C, "dport", "=", f":{PORT}")
            assert harness.wait_for(lambda: client.stderr_text().count("tunnel up to")
                                    + client.stderr_text().count("session resumed") > ups, timeout=10), \
                client.stderr_text()
        assert download.wait(timeout=90) == 0, download.stderr.read().decode()
    finally:
        if download.poll() is None:
            download.kill()
    with open(os.path.join(net.dir, "www", "large.bin"), "rb") as f:
        want = f.read()
    assert out.read_bytes() == want
    assert client.terminate() == 0
