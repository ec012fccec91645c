"""Fast open (issue 18, README "Fast open"): a CONNECT to a destination the server reached lately is answered at
once and its first bytes go with the OPEN; a first contact waits for the server's answer and keeps its exact
reply code; a cached destination that went down gives the application a reset, and the next attempt the real
code."""

import socket
import threading
import time

import harness
from harness import recv_exact, socks5_request


def listener(backlog=16):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)
    return s


def echo_once(server, prefix=b"echo:"):
    """Accepts one connection on `server` in a thread and answers each read with `prefix` + what it read."""
    def run():
        conn, _ = server.accept()
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(prefix + data)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def connect(tunnel, port, host="127.0.0.1"):
    """A SOCKS5 CONNECT: (socket, reply code, seconds until the reply)."""
    start = time.monotonic()
    s, rep, _, _ = socks5_request(tunnel.socks_port, host, port)
    return s, rep, time.monotonic() - start


def known_destination(tunnel, backlog=16):
    """A listener reached once through the tunnel (an echo exchange checked), so that the client knows it:
    (listening socket, port)."""
    server = listener(backlog)
    port = server.getsockname()[1]
    echo_once(server)
    s, rep, _ = connect(tunnel, port)
    assert rep == 0x00
    s.sendall(b"one")
    assert recv_exact(s, 8) == b"echo:one"
    s.close()
    time.sleep(0.2)
    return server, port


def test_first_contact_keeps_its_reply_code_and_a_known_destination_is_answered_before_the_server_connects(tunnel):
    tunnel.start()
    # First contact to a closed port: the real answer, connection refused.
    closed = harness.free_port()
    s, rep, _ = connect(tunnel, closed)
    assert rep == 0x05
    s.close()

    # First contact to a working destination: answered after the server connected; it is now known.
    server, port = known_destination(tunnel, backlog=1)

    # The destination stops accepting: its queue full, the kernel drops new SYNs, so the server's connect
    # hangs until the queue has room. The application is answered at once all the same, and sends at once.
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(f)
    time.sleep(0.3)
    s, rep, seconds = connect(tunnel, port)
    assert rep == 0x00
    assert seconds < 0.5, f"answered after {seconds:.2f} s: it waited for the server's connect"
    s.sendall(b"early bytes")
    time.sleep(0.5)
    # Now the destination accepts again: the fillers, then (after the server's SYN is retried) the tunnel's
    # connection, which brings the early bytes intact.
    server.settimeout(10)
    deadline = time.monotonic() + 10
    got = b""
    while time.monotonic() < deadline:
        conn, _ = server.accept()
        conn.settimeout(0.5)
        try:
            got = conn.recv(100)
        except socket.timeout:
            got = b""
        if got:
            break
        conn.close()
    assert got == b"early bytes"
    conn.sendall(b"reply")
    assert recv_exact(s, 5) == b"reply"
    conn.close()
    s.close()
    for f in fillers:
        f.close()
    server.close()


def test_a_known_destination_that_went_down_gives_a_reset_then_the_real_code(tunnel):
    tunnel.start()
    server, port = known_destination(tunnel)
    server.close()
    time.sleep(0.2)

    # Answered at once (it worked a moment ago), then reset: never a silent success with nothing behind it.
    s, rep, _ = connect(tunnel, port)
    assert rep == 0x00
    s.settimeout(10)
    try:
        s.sendall(b"anyone?")
        data = s.recv(100)
        assert data == b"", f"got {data!r} from a destination that is down"
        raise AssertionError("the connection ended cleanly instead of with a reset")
    except ConnectionResetError:
        pass
    s.close()
    # The failure dropped it from the cache: the next attempt waits for the real answer.
    s, rep, _ = connect(tunnel, port)
    assert rep == 0x05
    s.close()


def test_fast_open_never_always_waits_for_the_real_answer(tunnel):
    tunnel.start(client_extra=["--fast-open", "never"])
    server = listener()
    port = server.getsockname()[1]
    echo_once(server)
    s, rep, _ = connect(tunnel, port)
    assert rep == 0x00
    s.close()
    server.close()
    time.sleep(0.2)
    s, rep, _ = connect(tunnel, port)
    assert rep == 0x05, "with fast open off, a destination that went down gets its exact code at once"
    s.close()


def test_fast_open_always_answers_a_first_contact_at_once(tunnel):
    tunnel.start(client_extra=["--fast-open", "always"])
    closed = harness.free_port()
    s, rep, _ = connect(tunnel, closed)
    assert rep == 0x00, "always: speed over reply codes"
    s.settimeout(10)
    try:
        assert s.recv(100) == b""
        raise AssertionError("the connection ended cleanly instead of with a reset")
    except ConnectionResetError:
        pass
    s.close()
    # The log counts it.
    tunnel.client.terminate()
    assert "fast open: 1 streams opened before the server's answer, 1 of them failed after" in tunnel.client.stderr_text()


def test_a_plain_http_request_goes_with_the_open_and_a_destination_that_went_down_aborts_it(tunnel):
    import http.server
    import subprocess

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello " + self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    tunnel.start()
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    port = origin.server_address[1]
    threading.Thread(target=origin.serve_forever, daemon=True).start()

    def get(path):
        return subprocess.run(["curl", "-sS", "--max-time", "10", "-w", " %{http_code}", "--proxy",
                               f"http://127.0.0.1:{tunnel.socks_port}", f"http://127.0.0.1:{port}{path}"],
                              capture_output=True, text=True)

    out = get("/first")
    assert out.stdout == "hello /first 200", out.stderr
    out = get("/second")  # known now: the request went with the open
    assert out.stdout == "hello /second 200", out.stderr
    origin.shutdown()
    origin.server_close()
    time.sleep(0.2)
    out = get("/gone")
    assert out.returncode in (52, 56), f"curl {out.returncode}: {out.stdout} {out.stderr}"  # aborted, not a response
    out = get("/again")
    assert out.stdout.endswith(" 502"), f"{out.stdout} {out.stderr}"  # the real answer: refused
    tunnel.client.terminate()
    # /second and /gone went early; /gone failed after.
    assert "fast open: 2 streams opened before the server's answer, 1 of them failed after" in tunnel.client.stderr_text()
