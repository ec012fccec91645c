"""A server name with a dead IPv6 address and a live IPv4 one (AAAA answered but SYNs dropped, as on many
half-configured networks): the client must come up over IPv4 and serve every request, as it does with the
IPv4 literal. Two network namespaces, made and removed here; the name comes from /etc/netns/NAME/hosts, which
`ip netns exec` puts in place of /etc/hosts."""

import os
import shutil
import subprocess
import sys

import pytest

import harness
from conftest import have_root_netns
from harness import CLIENT_BIN, Process

pytestmark = pytest.mark.skipif(not have_root_netns() or shutil.which("nft") is None,
                                reason="needs root, `ip netns` and nft")

PID = os.getpid() % 100000
NS_C, NS_S = f"dsc{PID}", f"dss{PID}"
SERVER4, SERVER6 = "10.232.1.1", "fd32:1::1"
PORT = 7443


def sh(*args, check=True):
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stdout}{out.stderr}")
    return out


@pytest.fixture
def dual_stack():
    hosts_dir = f"/etc/netns/{NS_C}"
    try:
        for ns in (NS_C, NS_S):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"dsc{PID}v", "netns", NS_C, "type", "veth", "peer", "name", f"dss{PID}v", "netns", NS_S)
        sh("ip", "-n", NS_C, "addr", "add", "10.232.1.2/24", "dev", f"dsc{PID}v")
        sh("ip", "-n", NS_S, "addr", "add", f"{SERVER4}/24", "dev", f"dss{PID}v")
        sh("ip", "-n", NS_C, "addr", "add", "fd32:1::2/64", "dev", f"dsc{PID}v", "nodad")
        sh("ip", "-n", NS_S, "addr", "add", f"{SERVER6}/64", "dev", f"dss{PID}v", "nodad")
        sh("ip", "-n", NS_C, "link", "set", f"dsc{PID}v", "up")
        sh("ip", "-n", NS_S, "link", "set", f"dss{PID}v", "up")
        # The server's IPv6 address answers nothing on the tunnel port: SYNs vanish.
        sh("ip", "netns", "exec", NS_S, "nft", "add table inet blackhole; "
           "add chain inet blackhole input { type filter hook input priority 0; }; "
           f"add rule inet blackhole input ip6 daddr {SERVER6} tcp dport {PORT} drop")
        os.makedirs(hosts_dir, exist_ok=True)
        with open(f"{hosts_dir}/hosts", "w") as f:
            f.write(f"127.0.0.1 localhost\n{SERVER6} tunnel.test\n{SERVER4} tunnel.test\n")
        yield
    finally:
        for ns in (NS_C, NS_S):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(hosts_dir, ignore_errors=True)


def test_a_dead_ipv6_address_of_the_server_name_leaves_the_client_working(tunnel, dual_stack, tmp_path):
    web = subprocess.Popen(["ip", "netns", "exec", NS_S, sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                            "--directory", str(tmp_path), "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "hello.txt").write_text("hello over the dual-stack name\n")
    try:
        tunnel.start_server(listen=f"[::]:{PORT}", netns=NS_S)
        args = [CLIENT_BIN, "--server", f"tunnel.test:{PORT}", "--server-key", tunnel.server_pub,
                "--key", tunnel.client_key, "--socks", "127.0.0.1:0", "--log-level", "debug"]
        tunnel.client = Process(args, r"SOCKS5 listening on (\S+)", str(tmp_path / "client.log"), netns=NS_C)
        tunnel.processes.append(tunnel.client)
        tunnel.wait_until_connected(timeout=20)
        for _ in range(3):
            out = sh("ip", "netns", "exec", NS_C, "curl", "-sS", "--max-time", "10", "--socks5-hostname",
                     f"127.0.0.1:{tunnel.socks_port}", "http://127.0.0.1:8080/hello.txt", check=False)
            assert out.stdout == "hello over the dual-stack name\n", out.stderr + tunnel.client.stderr_text()[-3000:]
        assert "10.232.1.2" in tunnel.server.stderr_text(), "the tunnel should have come up over IPv4"
        assert "descriptor not found" not in tunnel.client.stderr_text()
    finally:
        web.kill()
