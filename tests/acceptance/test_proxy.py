"""Behind a reverse proxy: a real nginx (the shipped site, rendered for loopback ports and a
self-signed certificate) in front of a real `receiver serve`.

nginx runs as a child process with a temporary prefix and configuration, never as the system
service. It is installed with apt-get when missing (Debian's `nginx-light`, else `nginx`).
The test client connects from 127.0.0.2, so the address the service reports can only be the
original client's if the trusted-proxy handling works (nginx itself connects from 127.0.0.1).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import ADMIN_TOKEN, FakeVlmRun, Process, free_port, signed

pytestmark = pytest.mark.acceptance

SITE = Path(__file__).parents[2] / "deploy" / "nginx" / "receiver.conf"
CLIENT_ADDRESS = "127.0.0.2"  # loopback, but not a trusted proxy
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _install(*packages: str) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
    for package in packages:
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
            env=env,
            capture_output=True,
            timeout=600,
        )
        if done.returncode == 0:
            return True
    return False


def _require(binary: str, *packages: str) -> str:
    """The binary's path; installed with apt-get when missing (skipped without it, except in
    CI where a missing tool must fail the run)."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found is None and _install(*packages):
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if found is None:
        message = f"{binary} is not installed and could not be installed with apt-get"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    return _require("nginx", "nginx-light", "nginx")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts exactly this one)."""
    openssl = _require("openssl", "openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def render_site(
    text: str,
    *,
    http_port: int,
    https_port: int,
    upstream_port: int,
    cert: Path,
    key: Path,
    folder: Path,
    extra_locations: str = "",
) -> str:
    """The shipped site with loopback ports, the test certificate and log files in `folder`.
    Every substitution must apply: if the shipped file changes shape, this fails loudly."""
    replacements = [
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:80;", ""),  # the test machine may have no IPv6
        ("listen [::]:443 ssl;", ""),
        ("/etc/nginx/tls/fullchain.pem", str(cert)),
        ("/etc/nginx/tls/privkey.pem", str(key)),
        ("/var/log/nginx/", f"{folder}/"),
        ("/var/www/acme", str(folder / "acme")),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};"),
    ]
    for old, new in replacements:
        assert old in text, f"deploy/nginx/receiver.conf no longer contains {old!r}"
        text = text.replace(old, new)
    if extra_locations:
        anchor = "    location / {\n        proxy_pass http://receiver;"
        assert text.count(anchor) == 1
        text = text.replace(anchor, extra_locations + "\n" + anchor)
    return text


def main_config(folder: Path, site: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may read the temp folder
    temp = "\n".join(
        f"    {kind}_temp_path {folder}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log info;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n{temp}\n    access_log off;\n    include {site};\n}}\n"
    )


@dataclass
class Nginx:
    https_url: str
    http_url: str
    folder: Path
    proc: subprocess.Popen[bytes]

    def access_log(self) -> str:
        path = self.folder / "receiver.access.log"
        return path.read_text() if path.exists() else ""


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on {port}")


@pytest.fixture
def start_nginx(nginx_bin: str, certificate: tuple[Path, Path], tmp_path: Path) -> Iterator[Any]:
    """A factory: `start_nginx(upstream_port, extra_locations)` runs the shipped site in
    front of a service port and returns an `Nginx`; stopped (SIGQUIT, graceful) at teardown."""
    running: list[Nginx] = []

    def start(upstream_port: int, extra_locations: str = "") -> Nginx:
        folder = tmp_path / f"nginx{len(running)}"
        folder.mkdir()
        (folder / "acme").mkdir()
        http_port, https_port = free_port(), free_port()
        cert, key = certificate
        site = folder / "receiver.conf"
        site.write_text(
            render_site(
                SITE.read_text(),
                http_port=http_port,
                https_port=https_port,
                upstream_port=upstream_port,
                cert=cert,
                key=key,
                folder=folder,
                extra_locations=extra_locations,
            )
        )
        conf = folder / "nginx.conf"
        conf.write_text(main_config(folder, site))
        with (folder / "stderr.log").open("ab") as out:
            proc = subprocess.Popen(
                [nginx_bin, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Nginx(
            f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", folder, proc
        )
        running.append(server)
        _wait_tcp(https_port, proc, folder / "error.log")
        return server

    yield start
    for server in running:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGQUIT)
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


@pytest.fixture
def tls_client(certificate: tuple[Path, Path]) -> Iterator[httpx.Client]:
    """An HTTPS client from 127.0.0.2 that trusts only the test certificate."""
    context = ssl.create_default_context(cafile=str(certificate[0]))
    transport = httpx.HTTPTransport(verify=context, local_address=CLIENT_ADDRESS)
    with httpx.Client(transport=transport, timeout=15) as client:
        yield client


def log_lines(proc: Process) -> list[dict[str, Any]]:
    lines = []
    for raw in proc.logs().splitlines():
        if raw.startswith("{"):
            lines.append(orjson.loads(raw))
    return lines


def access_line(proc: Process, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The service's access line for `request_id` (logs are buffered for up to 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            line
            for line in log_lines(proc)
            if line.get("event") == "http.request" and line.get("request_id") == request_id
        ]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no access line with request_id {request_id}")
        time.sleep(0.1)


def prediction(pred_id: str, status: str = "completed") -> bytes:
    return orjson.dumps({"id": pred_id, "status": status, "domain": "document.invoice"})


def test_shipped_site_passes_nginx_t(
    nginx_bin: str, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    """`nginx -t` accepts deploy/nginx/receiver.conf (with test ports, paths and certificate)."""
    cert, key = certificate
    (tmp_path / "acme").mkdir()
    site = tmp_path / "receiver.conf"
    site.write_text(
        render_site(
            SITE.read_text(),
            http_port=free_port(),
            https_port=free_port(),
            upstream_port=free_port(),
            cert=cert,
            key=key,
            folder=tmp_path,
        )
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(main_config(tmp_path, site))
    checked = subprocess.run(
        [nginx_bin, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_callback_through_nginx_is_recorded_and_the_client_is_the_original_one(
    start_service: Any,
    start_nginx: Any,
    fake_vlmrun: FakeVlmRun,
    tls_client: httpx.Client,
) -> None:
    """Through nginx over TLS: the job's callback URL is built from RECEIVER_PUBLIC_URL, the
    signed callback sent to it is recorded, and the service logs the original client address
    and scheme, whatever X-Forwarded-For the client sent; the access logs hold no token."""
    upstream = free_port()
    proxy = start_nginx(upstream)
    public = proxy.https_url
    service = start_service(
        env={
            "RECEIVER_PORT": str(upstream),
            "RECEIVER_PUBLIC_URL": public,
            "RECEIVER_VLMRUN_API_KEY": "key",
            "RECEIVER_VLMRUN_BASE_URL": fake_vlmrun.url,
            "RECEIVER_ALLOWED_HOSTS": "127.0.0.1,localhost",
        }
    )

    r = tls_client.post(
        f"{public}/v1/jobs",
        json={"url": "https://example.com/a.pdf", "domain": "document.invoice"},
        headers={**ADMIN, "X-Request-ID": "proxy-submit-1"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == "proxy-submit-1"
    job = r.json()
    callback_url = fake_vlmrun.callback_urls[job["prediction_id"]]
    assert callback_url.startswith(f"{public}/callbacks/vlmrun/")
    token = callback_url.rsplit("/", 1)[1]

    body = prediction(job["prediction_id"])
    answer = tls_client.post(
        callback_url,
        content=body,
        headers={**signed(body), "X-Forwarded-For": "203.0.113.9", "X-Request-ID": "proxy-cb-1"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "recorded"
    assert answer.headers["x-request-id"] == "proxy-cb-1"
    events = tls_client.get(f"{public}/v1/jobs/{job['id']}", headers=ADMIN).json()["events"]
    assert [e["status"] for e in events] == ["completed"]

    seen = access_line(service, "proxy-submit-1")
    assert (seen["client"], seen["scheme"]) == (CLIENT_ADDRESS, "https")
    tls_client.get(
        f"{public}/healthz",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "proxy-spoof-1"},
    )
    assert access_line(service, "proxy-spoof-1")["client"] == CLIENT_ADDRESS

    # Straight to the service from an untrusted peer: its forwarding headers are ignored.
    direct = httpx.Client(transport=httpx.HTTPTransport(local_address=CLIENT_ADDRESS))
    with direct:
        direct.get(
            f"{service.url}/healthz",
            headers={
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=203.0.113.9;proto=https",
                "X-Request-ID": "direct-spoof-1",
            },
        )
    seen = access_line(service, "direct-spoof-1")
    assert (seen["client"], seen["scheme"]) == (CLIENT_ADDRESS, "http")

    # Hosts outside RECEIVER_ALLOWED_HOSTS are refused, callbacks included (nothing recorded).
    again = prediction(job["prediction_id"], "failed")
    evil = {"Host": "evil.example.com"}
    assert tls_client.get(f"{public}/healthz", headers=evil).status_code == 400
    refused = tls_client.post(callback_url, content=again, headers={**signed(again), **evil})
    assert refused.status_code == 400
    events = tls_client.get(f"{public}/v1/jobs/{job['id']}", headers=ADMIN).json()["events"]
    assert len(events) == 1

    # The shipped site: plain HTTP redirects with 308, /metrics is for loopback only.
    plain = httpx.get(f"{proxy.http_url}/healthz", headers={"Host": "127.0.0.1"})
    assert plain.status_code == 308
    assert plain.headers["location"] == "https://127.0.0.1/healthz"
    assert tls_client.get(f"{public}/metrics").status_code == 403

    time.sleep(0.6)  # the service's buffered lines reach the file
    assert "/callbacks/vlmrun/***" in proxy.access_log()
    for text in (proxy.access_log(), service.logs()):
        assert token not in text


@pytest.mark.parametrize("strip", [True, False], ids=["proxy-strips-prefix", "prefix-kept"])
def test_mounted_under_a_prefix_behind_nginx(
    strip: bool,
    start_service: Any,
    start_nginx: Any,
    fake_vlmrun: FakeVlmRun,
    tls_client: httpx.Client,
) -> None:
    """With RECEIVER_ROOT_PATH=/receiver, the API, callbacks, Location headers and the OpenAPI
    `servers` work under /receiver, whether nginx strips the prefix or passes it on."""
    upstream = free_port()
    # `proxy_pass http://receiver/;` replaces the matched /receiver/ with /: the prefix is
    # stripped. Without the URI part the path goes upstream as it came.
    target = "http://receiver/" if strip else "http://receiver"
    location = f"    location /receiver/ {{\n        proxy_pass {target};\n    }}\n"
    proxy = start_nginx(upstream, location)
    public = f"{proxy.https_url}/receiver"
    start_service(
        env={
            "RECEIVER_PORT": str(upstream),
            "RECEIVER_PUBLIC_URL": public,
            "RECEIVER_ROOT_PATH": "/receiver",
            "RECEIVER_VLMRUN_API_KEY": "key",
            "RECEIVER_VLMRUN_BASE_URL": fake_vlmrun.url,
        }
    )
    r = tls_client.post(
        f"{public}/v1/jobs",
        json={"url": "https://example.com/a.pdf", "domain": "document.invoice"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/receiver/v1/jobs/{job['id']}"
    callback_url = fake_vlmrun.callback_urls[job["prediction_id"]]
    assert callback_url.startswith(f"{public}/callbacks/vlmrun/")

    body = prediction(job["prediction_id"])
    answer = tls_client.post(callback_url, content=body, headers=signed(body))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "recorded"
    got = tls_client.get(f"{proxy.https_url}{r.headers['location']}", headers=ADMIN)
    assert [e["status"] for e in got.json()["events"]] == ["completed"]
    assert tls_client.get(f"{public}/healthz").status_code == 200
    spec = tls_client.get(f"{public}/openapi.json").json()
    assert spec["servers"] == [{"url": "/receiver"}]


def test_forwarded_header_is_believed_only_from_a_trusted_proxy(start_service: Any) -> None:
    """RFC 7239 `Forwarded` sets the client address and scheme when the peer is a trusted
    proxy (and the request has no X-Forwarded-For); from any other peer it is ignored."""
    service = start_service(env={"RECEIVER_TRUSTED_PROXIES": "127.0.0.1"})
    forwarded = 'for=192.0.2.60;proto=http, for="[2001:db8::17]:4711";proto=https, for=127.0.0.1'
    httpx.get(
        f"{service.url}/healthz", headers={"Forwarded": forwarded, "X-Request-ID": "fwd-trusted"}
    )
    with httpx.Client(transport=httpx.HTTPTransport(local_address=CLIENT_ADDRESS)) as other:
        other.get(
            f"{service.url}/healthz",
            headers={"Forwarded": forwarded, "X-Request-ID": "fwd-untrusted"},
        )
    # The rightmost address that is not a trusted proxy is the client; its hop's proto counts.
    trusted = access_line(service, "fwd-trusted")
    assert (trusted["client"], trusted["scheme"]) == ("2001:db8::17", "https")
    untrusted = access_line(service, "fwd-untrusted")
    assert (untrusted["client"], untrusted["scheme"]) == (CLIENT_ADDRESS, "http")
