"""A real browser opens the report: headless Chromium driven over the DevTools protocol (a pipe, no
network port), with background networking off. It records every network request, console message,
log entry and uncaught exception, then takes a full-page screenshot.

A control page that loads an external image proves the harness sees requests and console errors,
so the checks on the report can fail. Skips only when no Chromium is installed.
"""
from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "",
                             shutil.which("google-chrome") or "") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium'); "
                                                         ".ci/run installs it")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-default-apps", "--disable-extensions", "--remote-debugging-pipe",
         "--window-size=1200,4000")


class Browser:
    """Minimal DevTools client over --remote-debugging-pipe (fd 3: commands in, fd 4: events out)."""

    def __init__(self, profile: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()

        def child_fds() -> None:  # runs in the child before exec: put the pipe ends on fds 3 and 4
            a, b = os.dup(cmd_r), os.dup(evt_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(evt_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _recv(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._evt_r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._evt_r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._recv(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self._recv(end - time.monotonic())
            self.events.append(m)
            if m.get("method") == method:
                return
        raise TimeoutError(method)

    def drain(self, quiet: float = 0.5) -> None:
        while True:
            try:
                self.events.append(self._recv(quiet))
            except TimeoutError:
                return

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._cmd_w)
        os.close(self._evt_r)


def visit(url: str, profile: Path) -> tuple[list[dict], bytes, dict, list[tuple[int, int, int, int]]]:
    """Open `url`, wait for load, return (events, full-page PNG, layout metrics, the page boxes
    (x0, y0, x1, y1) of its <img> elements, found through the DOM domain: the page runs no script)."""
    b = Browser(profile)
    try:
        target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            b.call(f"{domain}.enable", session=s)
        b.call("Page.navigate", {"url": url}, session=s)
        b.wait_for("Page.loadEventFired")
        b.drain()
        metrics = b.call("Page.getLayoutMetrics", session=s)
        root = b.call("DOM.getDocument", session=s)["root"]["nodeId"]
        boxes = []
        for node in b.call("DOM.querySelectorAll", {"nodeId": root, "selector": "img"}, session=s)["nodeIds"]:
            q = b.call("DOM.getBoxModel", {"nodeId": node}, session=s)["model"]["content"]
            boxes.append((round(min(q[0::2])), round(min(q[1::2])), round(max(q[0::2])), round(max(q[1::2]))))
        size = metrics["cssContentSize"]
        shot = b.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                 "clip": {"x": 0, "y": 0, "width": size["width"],
                                                          "height": size["height"], "scale": 1}},
                      session=s, timeout=60)
        return b.events, base64.b64decode(shot["data"]), metrics, boxes
    finally:
        b.close()


def problems(events: list[dict], page_url: str) -> list[str]:
    """Network requests other than the page itself and data: URIs, console errors, exceptions, log errors."""
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Network.requestWillBeSent":
            u = p["request"]["url"]
            if u != page_url and not u.startswith("data:"):
                out.append(f"request {u}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            out.append(f"console {p.get('type')}: {p.get('args')}")
        elif m == "Runtime.exceptionThrown":
            out.append(f"exception {p.get('exceptionDetails', {}).get('text')}")
        elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
            out.append(f"log {p['entry'].get('level')}: {p['entry'].get('text')}")
    return out


def test_harness_sees_requests_and_errors(tmp_path: Path) -> None:
    page = tmp_path / "control.html"
    page.write_text('<html><body><p>x</p><img src="https://example.invalid/a.png">'
                    "<script>console.error('boom')</script></body></html>")
    events, png, _, _ = visit(page.as_uri(), tmp_path / "profile")
    found = problems(events, page.as_uri())
    assert any(f.startswith("request https://example.invalid/") for f in found), found
    assert any("boom" in f for f in found), found


@pytest.fixture(scope="module")
def report_file(tiny_demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from analyze.cli import main

    out = tmp_path_factory.getbasetemp() / "tiny-demo-report"  # shared with test_cmd_report.py: cached there
    res = CliRunner().invoke(main, ["report", str(tiny_demo_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out / "report.html"


def test_report_in_chromium_requests_nothing_logs_nothing_and_renders(report_file: Path, tmp_path: Path) -> None:
    from PIL import Image

    url = report_file.as_uri()
    events, png, metrics, boxes = visit(url, tmp_path / "profile")
    assert problems(events, url) == []
    loaded = [e for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert [e["params"]["request"]["url"] for e in loaded][:1] == [url]  # the harness saw the page load itself
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    height = metrics["cssContentSize"]["height"]
    assert height > 3000  # all panels laid out, not an error page
    assert img.shape[0] >= 3000 and img.shape[1] >= 1000
    assert img.std() > 20  # not blank: text and figures
    assert (img < 128).mean() > 0.005  # dark pixels (text, axes) cover a visible share of the page
    # every figure the page holds is laid out and shows drawn data: coloured pixels (lines, markers,
    # bands, heat-map cells; the palette is coloured, while text, axes, ticks and grid are grey or
    # black), so a figure whose plot function drew nothing fails here even with its labels in place
    html = report_file.read_text(encoding="utf-8")
    assert len(boxes) == html.count('<img src="data:image/png;base64,') >= 10
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 > 300 and y1 - y0 > 150, (x0, y0, x1, y1)  # laid out at a readable size
        crop = rgb[y0:y1, x0:x1]
        chroma = crop.max(axis=2) - crop.min(axis=2)
        assert (chroma > 30).mean() > 5e-4, f"figure at y={y0} shows no coloured data"  # an empty axes: 0
    (report_file.parent / "screenshot.png").write_bytes(png)  # kept beside the report for a human look
