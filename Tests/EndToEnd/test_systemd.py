"""The service units in Examples/systemd (issue 20): `systemd-analyze verify` accepts them as installed (the
binaries' paths pointed at this build), the full-tunnel drop-in included, and the server unit's hardening holds:
no capabilities without --tun, only CAP_NET_ADMIN with it."""

import os
import re
import shutil
import subprocess

import pytest

from harness import BIN_DIR

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.join(HERE, "..", "..", "Examples", "systemd")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze (apt-get install systemd)")


def install(tmp_path, name, binary_dir, placeholder):
    text = open(os.path.join(UNITS, name)).read().replace(placeholder, binary_dir + "/")
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def verify(*args, env=None):
    out = subprocess.run(["systemd-analyze", "verify", *args], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, **(env or {})))
    # Lines about our units only: systemd may also comment on the host's own units.
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "tunnel-" in line]
    return out.returncode, ours


def directives(path, key):
    return [line.split("=", 1)[1] for line in open(path).read().splitlines() if line.startswith(key + "=")]


def test_the_server_unit_and_its_full_tunnel_drop_in_verify(tmp_path):
    bindir = os.path.abspath(BIN_DIR)
    unit = install(tmp_path, "tunnel-server.service", bindir, "/usr/local/bin/")
    dropin = install(tmp_path, "tunnel-server.service.d/tun.conf", bindir, "/usr/local/bin/")
    code, lines = verify("tunnel-server.service", env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert code == 0 and lines == [], lines
    # The drop-in is read: a bad line in it would show.
    with open(dropin, "a") as f:
        f.write("NoSuchSetting=1\n")
    code, lines = verify("tunnel-server.service", env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert any("NoSuchSetting" in line for line in lines), lines

    # No capabilities and a throwaway user without --tun; CAP_NET_ADMIN alone with it.
    assert directives(unit, "CapabilityBoundingSet") == [""] and directives(unit, "AmbientCapabilities") == [""]
    assert directives(unit, "DynamicUser") == ["yes"] and directives(unit, "NoNewPrivileges") == ["yes"]
    assert directives(unit, "ProtectSystem") == ["strict"] and directives(unit, "PrivateTmp") == ["yes"]
    assert directives(dropin, "CapabilityBoundingSet") == ["CAP_NET_ADMIN"]
    assert directives(dropin, "AmbientCapabilities") == ["CAP_NET_ADMIN"]
    assert any("--tun" in line for line in directives(dropin, "ExecStart"))
    # systemd's own rating of the unit's exposure (0 best, 10 worst).
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True,
                         timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert level and float(level.group(1)) <= 3.0, out.stdout[-2000:]


def test_the_client_user_unit_verifies(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    unit = install(tmp_path, "tunnel-client.service", os.path.abspath(BIN_DIR), "%h/.local/bin/")
    code, lines = verify("--user", str(unit), env={"XDG_RUNTIME_DIR": str(runtime)})
    assert code == 0 and lines == [], lines
    assert directives(unit, "NoNewPrivileges") == ["yes"]
    assert directives(unit, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
