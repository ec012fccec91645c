"""Headless Chromium loads a local multi-resource page through the tunnel, as a user's browser would, once
through the SOCKS5 port and once through the same port as an HTTP proxy. The script on the page only runs if
its file came through too, and the DOM Chromium dumps shows the result."""

import os
import shutil
import subprocess
import tempfile

import pytest

from webserver import Origin

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture
def origin():
    o = Origin("browser-origin")
    yield o
    o.stop()


def dump_dom(proxy, url):
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        out = subprocess.run([
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            f"--proxy-server={proxy}",
            # Chromium never proxies loopback unless told to: this page lives on loopback.
            "--proxy-bypass-list=<-loopback>",
            "--virtual-time-budget=5000", "--dump-dom", url,
        ], capture_output=True, text=True, timeout=90)
        return out.stdout, out.stderr
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.parametrize("scheme", ["socks5", "http"])
def test_chromium_loads_a_page_with_its_resources_through_the_tunnel(tunnel, origin, scheme):
    tunnel.start()
    dom, err = dump_dom(f"{scheme}://127.0.0.1:{tunnel.socks_port}", f"http://localhost:{origin.port}/page")
    assert "Page from browser-origin + script ran" in dom, err[-2000:]
    log = tunnel.client.stderr_text()
    # Every resource went through the tunnel: the page, its script and its image.
    if scheme == "socks5":
        assert log.count(f"CONNECT localhost:{origin.port}") >= 1
    else:
        for path in ("/page", "/app.js", "/img.png"):
            assert f"HTTP GET localhost:{origin.port}{path}" in log, log[-3000:]
    assert tunnel.server.proc.poll() is None
