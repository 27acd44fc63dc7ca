"""Health checks: real commands (including a hung one) and a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageswarm.agent.errors import InvalidInputError
from imageswarm.agent.health import HealthCheck, HealthResult, run_health_check


def _sh(script: str, *, timeout: float = 10.0, retries: int = 3) -> HealthCheck:
    return HealthCheck(
        command=("sh", "-c", script), timeout=timeout, retries=retries, interval=0.01
    )


def test_command_passes_on_exit_zero() -> None:
    assert run_health_check(_sh("exit 0")) == HealthResult(True, 1, "exit status 0")


def test_command_failure_reports_exit_status_and_last_lines() -> None:
    result = run_health_check(_sh("for i in 1 2 3 4 5 6 7; do echo line$i; done; exit 3"))
    assert not result.ok
    assert result.attempts == 3
    assert result.detail == "exit status 3: line3 | line4 | line5 | line6 | line7"


def test_command_gets_the_extra_environment() -> None:
    check = _sh('test "$IMAGESWARM_IMAGE" = img1 && test -n "$PATH"', retries=1)
    assert run_health_check(check, env={"IMAGESWARM_IMAGE": "img1"}).ok
    assert not run_health_check(check).ok


def test_missing_command_is_a_failure() -> None:
    result = run_health_check(HealthCheck(command=("/nonexistent/check",), retries=1))
    assert result == HealthResult(
        False, 1, "/nonexistent/check could not be run: No such file or directory"
    )


def _gone(pid: int) -> bool:
    """Exited: no such process any more, or a zombie waiting for a parent that is not us."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_hung_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The shell and a background child it waits for: both must die at the timeout.
    check = _sh(f"sleep 60 & echo $$ $! > {pids}; wait", timeout=0.5, retries=1)
    start = time.monotonic()
    result = run_health_check(check)
    assert time.monotonic() - start < 5
    assert result == HealthResult(False, 1, "timed out after 0.5 s and was killed")
    shell, child = map(int, pids.read_text().split())
    deadline = time.monotonic() + 5
    while not (_gone(shell) and _gone(child)):
        assert time.monotonic() < deadline, "the hung check is still running"
        time.sleep(0.02)


def test_retries_pass_on_the_third_attempt(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    script = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter}; "
        'echo "attempt $n"; test $n -ge 3'
    )
    result = run_health_check(_sh(script, retries=5))
    assert result == HealthResult(True, 3, "exit status 0")
    assert counter.read_text().strip() == "3"


def test_interval_separates_attempts() -> None:
    check = HealthCheck(
        command=(sys.executable, "-c", "raise SystemExit(1)"), retries=3, interval=0.2
    )
    start = time.monotonic()
    assert run_health_check(check).attempts == 3
    assert time.monotonic() - start >= 0.4


class _Handler(http.server.BaseHTTPRequestHandler):
    stall = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/slow":
            self.stall.wait(10)
        status = 500 if self.path == "/broken" else 200
        body = b"database is down\n" if status == 500 else b"ok\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client of /slow hangs up before the answer; that is the point


@pytest.fixture
def server() -> Iterator[str]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.stall.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.stall.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _url(url: str, *, timeout: float = 10.0, retries: int = 3) -> HealthCheck:
    return HealthCheck(url=url, timeout=timeout, retries=retries, interval=0.01)


def test_url_passes_on_2xx(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy in the environment must not be used for the node's own health.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    assert run_health_check(_url(f"{server}/ok")) == HealthResult(True, 1, "HTTP 200")


def test_url_500_is_reported_with_the_body(server: str) -> None:
    result = run_health_check(_url(f"{server}/broken", retries=2))
    assert result == HealthResult(False, 2, "HTTP 500 Internal Server Error: database is down")


def test_url_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_health_check(_url(f"http://127.0.0.1:{port}/", retries=1))
    assert result == HealthResult(False, 1, "connection refused")


def test_url_timeout(server: str) -> None:
    start = time.monotonic()
    result = run_health_check(_url(f"{server}/slow", timeout=0.3, retries=1))
    assert result == HealthResult(False, 1, "timed out after 0.3 s")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"command": ("true",), "url": "http://x/"},
        {"command": ()},
        {"command": ("",)},
        {"url": "ftp://host/x"},
        {"url": "file:///etc/passwd"},
        {"url": "http:///nohost"},
        {"command": ("true",), "timeout": 0},
        {"command": ("true",), "retries": 0},
        {"command": ("true",), "interval": -1},
    ],
)
def test_invalid_checks_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        HealthCheck(**kwargs)  # type: ignore[arg-type]


def test_command_that_exits_but_leaves_a_child_holding_its_output(tmp_path: Path) -> None:
    pid = tmp_path / "pid"
    check = _sh(f"sleep 60 & echo $! > {pid}; exit 0", timeout=0.5, retries=1)
    assert run_health_check(check) == HealthResult(True, 1, "exit status 0")
    deadline = time.monotonic() + 5
    while not _gone(int(pid.read_text())):
        assert time.monotonic() < deadline, "the check's leftover child is still running"
        time.sleep(0.02)


def test_command_killed_by_a_signal_says_which() -> None:
    result = run_health_check(_sh("echo dying; kill -TERM $$", retries=1))
    assert result == HealthResult(False, 1, "killed by SIGTERM: dying")
