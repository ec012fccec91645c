"""The command line as scripts depend on it: keygen, pubkey, help, exit codes, error lines."""

import base64
import os
import socket
import stat
import subprocess

import pytest

from harness import CLIENT_BIN, SERVER_BIN, keygen


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("binary", [SERVER_BIN, CLIENT_BIN])
def test_keygen_writes_0600_key_and_prints_public_key(binary, tmp_path):
    path = tmp_path / "k"
    out = run(binary, "keygen", "--out", str(path))
    assert out.returncode == 0, out.stderr
    pub = out.stdout.strip()
    assert out.stdout.count("\n") == 1
    assert len(base64.b64decode(pub, validate=True)) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    line = path.read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    assert len(base64.b64decode(line.strip(), validate=True)) == 32
    # pubkey prints the same key
    again = run(binary, "pubkey", "--key", str(path))
    assert again.returncode == 0 and again.stdout.strip() == pub


@pytest.mark.parametrize("binary", [SERVER_BIN, CLIENT_BIN])
def test_keygen_refuses_to_overwrite_without_force(binary, tmp_path):
    path = tmp_path / "k"
    first = keygen(binary, str(path))
    out = run(binary, "keygen", "--out", str(path))
    assert out.returncode == 2
    assert str(path) in out.stderr and "--force" in out.stderr
    assert run(binary, "pubkey", "--key", str(path)).stdout.strip() == first
    forced = run(binary, "keygen", "--force", "--out", str(path))
    assert forced.returncode == 0 and forced.stdout.strip() != first


@pytest.mark.parametrize("binary,options", [
    (SERVER_BIN, ["--listen", "--key", "--authorized-keys", "--config", "--log-level"]),
    (CLIENT_BIN, ["--server", "--server-key", "--key", "--socks", "--config", "--log-level"]),
])
def test_help_explains_every_option_with_default(binary, options):
    out = run(binary, "--help")
    assert out.returncode == 0
    for option in options:
        assert option in out.stdout
    assert "default" in out.stdout
    for sub in ("keygen", "pubkey"):
        sub_help = run(binary, sub, "--help")
        assert sub_help.returncode == 0 and "--" in sub_help.stdout


def test_client_help_names_socks_default():
    assert "127.0.0.1:1080" in run(CLIENT_BIN, "--help").stdout


@pytest.mark.parametrize("args,needle", [
    (["--listen", "nonsense"], "--listen"),
    (["--listen", "127.0.0.1:99999"], "--listen"),
    (["--listen", "127.0.0.1:0", "--log-level", "loud"], "log level"),
    (["--bogus-flag"], "bogus"),
    (["--listen", "127.0.0.1:0"], "--key"),
])
def test_server_bad_arguments_exit_2_with_one_line(args, needle, tmp_path):
    out = run(SERVER_BIN, *args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_unreadable_and_malformed_files_name_the_file(tmp_path):
    key = tmp_path / "server.key"
    keygen(SERVER_BIN, str(key))
    good_auth = tmp_path / "auth"
    good_auth.write_text(keygen(CLIENT_BIN, str(tmp_path / "c.key")) + "\n")
    cases = []
    missing = tmp_path / "missing.key"
    cases.append((["--key", str(missing), "--authorized-keys", str(good_auth)], str(missing)))
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("definitely not a key\n")
    cases.append((["--key", str(bad_key), "--authorized-keys", str(good_auth)], str(bad_key)))
    bad_auth = tmp_path / "bad_auth"
    bad_auth.write_text("# ok\nAAAA not-a-key\n")
    cases.append((["--key", str(key), "--authorized-keys", str(bad_auth)], "line 2"))
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text('listen = "127.0.0.1:0"\nconect_timeout = "5s"\n')
    cases.append((["--key", str(key), "--authorized-keys", str(good_auth), "--config", str(bad_config)], "conect_timeout"))
    broken_config = tmp_path / "broken.toml"
    broken_config.write_text('listen = 127.0.0.1\n')
    cases.append((["--key", str(key), "--authorized-keys", str(good_auth), "--config", str(broken_config)], "line 1"))
    for n, value in enumerate(['"9999999999999h"', "99999999999", '"1e300s"']):
        # Values that overflow when turned into nanoseconds: a one-line error, not a crash (SIGILL).
        overflowing = tmp_path / f"overflow{n}.toml"
        overflowing.write_text(f"connect_timeout = {value}\n")
        cases.append((["--key", str(key), "--authorized-keys", str(good_auth), "--config", str(overflowing)],
                      f"overflow{n}.toml: line 1: 'connect_timeout'"))
    for args, needle in cases:
        out = run(SERVER_BIN, "--listen", "127.0.0.1:0", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert needle in out.stderr, (needle, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_client_bad_server_key_and_missing_flags(tmp_path):
    key = tmp_path / "c.key"
    keygen(CLIENT_BIN, str(key))
    out = run(CLIENT_BIN, "--server", "127.0.0.1:1", "--server-key", "abc", "--key", str(key))
    assert out.returncode == 2 and "--server-key" in out.stderr
    out = run(CLIENT_BIN, "--server-key", "abc")
    assert out.returncode == 2
    out = run(CLIENT_BIN, "--server", "127.0.0.1:1", "--server-key", keygen(SERVER_BIN, str(tmp_path / "s.key")))
    assert out.returncode == 2 and "--key" in out.stderr


def test_config_file_supplies_everything_and_flags_override(tunnel, tmp_path):
    import harness
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        f'# server\nlisten = "127.0.0.1:1"\nkey = "{tunnel.server_key}"\n'
        f'authorized_keys = "{tunnel.authorized}"\nlog_level = "debug"\nconnect_timeout = "3s"\n')
    server = tunnel.start_server(listen="127.0.0.1:0", config=str(server_toml))  # the flag overrides the file
    assert server.port != 1
    client_toml = tmp_path / "client.toml"
    client_toml.write_text(
        f'server = "{server.address}"\nserver_key = "{tunnel.server_pub}"\nkey = "{tunnel.client_key}"\n'
        f'socks = "127.0.0.1:0"\nlog_level = "debug"\n')
    client = harness.Process([CLIENT_BIN, "--config", str(client_toml)], r"SOCKS5 listening on (\S+)",
                             str(tmp_path / "cfg-client.log"))
    tunnel.processes.append(client)
    tunnel.wait_until_connected(client)
    typo = tmp_path / "typo.toml"
    typo.write_text(client_toml.read_text() + "[extra]\nfoo = 1\n")
    out = run(CLIENT_BIN, "--config", str(typo))
    assert out.returncode == 2 and "extra.foo" in out.stderr and str(typo) in out.stderr


def test_example_configs_parse(tunnel):
    """Configs/*.toml are real, parseable files (flags override their placeholder paths)."""
    import harness
    config = os.path.join(harness.ROOT, "Configs", "server.toml")
    tunnel.start_server(listen="127.0.0.1:0", config=config)
    client_config = os.path.join(harness.ROOT, "Configs", "client.toml")
    client = tunnel.start_client(config=client_config)
    tunnel.wait_until_connected(client)


def test_a_port_in_use_names_the_address_and_the_flag(tunnel):
    """Binding a port another process holds says which address, that another process holds it, and which
    setting chooses another (it used to print NIO's bind error and errno)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        out = run(SERVER_BIN, "--listen", f"127.0.0.1:{port}", "--key", tunnel.server_key,
                  "--authorized-keys", tunnel.authorized)
        assert out.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}: another process is using this address" in out.stderr, out.stderr
        assert "--listen" in out.stderr and "errno" not in out.stderr, out.stderr
        out = run(CLIENT_BIN, "--server", "127.0.0.1:1", "--server-key", tunnel.server_pub, "--key", tunnel.client_key,
                  "--socks", f"127.0.0.1:{port}")
        assert out.returncode != 0
        assert f"cannot listen for SOCKS5 on 127.0.0.1:{port}: another process is using this address" in out.stderr, out.stderr
        assert "--socks" in out.stderr, out.stderr
    finally:
        busy.close()


def test_key_files_are_not_read_or_written_through_a_symbolic_link(tmp_path):
    """A key file is opened without following a link: whoever can plant one must not choose what is read, nor
    where `keygen --force` writes."""
    real = tmp_path / "real.key"
    keygen(CLIENT_BIN, str(real))
    link = tmp_path / "link.key"
    os.symlink(real, link)
    out = run(CLIENT_BIN, "pubkey", "--key", str(link))
    assert out.returncode == 2 and "symbolic link" in out.stderr, out.stderr
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "planted.key")
    out = run(CLIENT_BIN, "keygen", "--force", "--out", str(tmp_path / "planted.key"))
    assert out.returncode == 2 and "symbolic link" in out.stderr, out.stderr
    assert victim.read_text() == "precious\n"


def _state_file_config(tmp_path, state):
    config = tmp_path / "client.toml"
    config.write_text(f'state_file = "{state}"\n')
    return str(config)


def _journal(commands):
    """A state file as the client writes it (version 2, this boot, a namespace that is not this one)."""
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    lines = ["tunnel-state 2", f"host {boot} 1 1"]
    for words in commands:
        lines.append("cmd " + " ".join(w.encode().hex() for w in words))
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_crash_recovery_refuses_a_state_file_others_could_have_written(tmp_path):
    """The state file's commands run as root after a crash: one that another user owns or could have written
    (or that sits in a directory others can write to, like /tmp) is refused, and nothing in it runs."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    # Harmless if it ever ran: the address does not parse.
    text = _journal([["ip", "-4", "addr", "del", "999.1.1.1/32", "dev", "lo"]])
    cases = []
    group_writable = directory / "group.state"
    group_writable.write_text(text)
    os.chmod(group_writable, 0o660)
    cases.append((group_writable, "can be written by group or others"))
    foreign = directory / "foreign.state"
    foreign.write_text(text)
    os.chmod(foreign, 0o600)
    os.chown(foreign, 65534, 65534)
    cases.append((foreign, "belongs to uid 65534"))
    link = directory / "link.state"
    os.symlink(foreign, link)
    cases.append((link, "symbolic link"))
    open_directory = tmp_path / "open"
    open_directory.mkdir()
    os.chmod(open_directory, 0o1777)
    in_open = open_directory / "x.state"
    in_open.write_text(text)
    os.chmod(in_open, 0o600)
    cases.append((in_open, "its directory can be written by group or others"))
    for state, needle in cases:
        config = _state_file_config(tmp_path, state)
        out = run(CLIENT_BIN, "--config", config, "--recover-only")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "refusing the state file" in out.stderr and needle in out.stderr, out.stderr
        assert os.path.lexists(state), "a refused state file stays for its owner to look at"
    # The same file, ours and private: accepted (its command was written in another namespace, so it is not run).
    ours = directory / "ours.state"
    ours.write_text(text)
    os.chmod(ours, 0o600)
    out = run(CLIENT_BIN, "--config", _state_file_config(tmp_path, ours), "--recover-only")
    assert out.returncode == 0, out.stderr
    assert "another network namespace" in out.stderr and not ours.exists(), out.stderr
    # A file that names any tool but ip and nft is not ours: nothing runs, and it is removed.
    marker = tmp_path / "pwned"
    evil = directory / "evil.state"
    evil.write_text(_journal([["sh", "-c", f"touch {marker}"]]).replace(" 1 1\n", f" {_netns_identity()}\n", 1))
    os.chmod(evil, 0o600)
    out = run(CLIENT_BIN, "--config", _state_file_config(tmp_path, evil), "--recover-only")
    assert out.returncode == 0 and "not a state file of this program" in out.stderr, out.stderr
    assert not marker.exists() and not evil.exists()


def _netns_identity():
    """This namespace's inode and cookie as the journal records them (cookie: SO_NETNS_COOKIE)."""
    inode = os.stat("/proc/self/ns/net").st_ino
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")
    finally:
        s.close()
    return f"{inode} {cookie}"
