"""A small HTTP/1.1 origin server for the proxy tests: keep-alive, fixed-length, chunked and close-delimited
responses, a POST echo, and an HTTPS variant with a throw-away self-signed certificate."""

import http.server
import os
import socket
import ssl
import subprocess
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_name_tag = "origin"

    def log_message(self, *args):
        pass

    def do_GET(self):
        tag = self.server.tag
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for part in (b"chunk-one ", b"chunk-two ", tag.encode()):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/close"):
            body = f"close-delimited from {tag}".encode()
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        if self.path.startswith("/big"):
            n = int(self.path.split("/")[-1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * 65536
            left = n
            while left > 0:
                self.wfile.write(block[:min(left, len(block))])
                left -= min(left, len(block))
            return
        if self.path.startswith("/pattern/"):
            # n bytes of the tests' random pattern (harness.pattern_bytes), with a length or chunked.
            import harness
            n = int(self.path.split("/")[2])
            chunked = self.path.endswith("/chunked")
            self.send_response(200)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(n))
            self.end_headers()
            offset = 0
            while offset < n:
                block = harness.pattern_bytes(offset, min(n - offset, 1 << 18))
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                offset += len(block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/slow"):
            # The first bytes at once, the rest after a pause: a proxy must pass them on as they come.
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"5\r\nfirst\r\n")
            self.wfile.flush()
            import time
            time.sleep(1.5)
            self.wfile.write(b"6\r\nsecond\r\n0\r\n\r\n")
            return
        if self.path.startswith("/page"):
            body = f"<html><body><h1 id='title'>Page from {tag}</h1><img src='/img.png'><script src='/app.js'></script></body></html>".encode()
            self.reply(200, body, "text/html")
            return
        if self.path.startswith("/app.js"):
            self.reply(200, b"document.getElementById('title').textContent += ' + script ran';", "application/javascript")
            return
        if self.path.startswith("/img.png"):
            png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                "1f15c4890000000d49444154789c6360000000000500010d0a2db40000000049454e44ae426082")
            self.reply(200, png, "image/png")
            return
        body = f"hello from {tag} path={self.path} host={self.headers.get('Host')} " \
               f"proxy-headers={[h for h in self.headers if h.lower().startswith('proxy')]}".encode()
        self.reply(200, body, "text/plain")

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "12345")
        self.end_headers()

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.reply(200, b"echo:" + data, "application/octet-stream")

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Origin:
    def __init__(self, tag="origin", host="127.0.0.1", tls_dir=None):
        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True
        self.server = Server((host, 0), Handler)
        self.server.tag = tag
        if tls_dir:
            cert = os.path.join(tls_dir, "cert.pem")
            key = os.path.join(tls_dir, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
                           check=True, capture_output=True)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
