"""The SIGKILL harness of the logger crash tests: a server process imports torch once and forks
one child per trial (fork is ~ms, a fresh interpreter with torch ~1 s); the child logs until
killed and acknowledges each flush over a pipe only after it returned; the server kills it with
SIGKILL after a random delay and returns the last acknowledged step."""
from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


def fork_log_and_kill(child: Callable[[Callable[[int], None]], None], max_delay: float,
                      rng: random.Random, min_delay: float = 0.0) -> int:
    """Fork; the child runs `child(ack)` (ack(step) after each flush); kill it after a random delay.

    Returns the last acknowledged step (-1 when none was)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child: log until killed
        os.close(r)
        child(lambda step: os.write(w, f"{step}\n".encode()))
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + rng.uniform(min_delay, max_delay)
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    buf += os.read(r, 1 << 20) if select.select([r], [], [], 0)[0] else b""
    os.close(r)
    acked = [int(x) for x in buf.decode().split()]
    return acked[-1] if acked else -1


def run_server(script: str, root: Path, trials: int, seed: int) -> dict[str, Any]:
    """Run a server script (argv: root, trials, seed) in a fresh interpreter; its last stdout line
    is the JSON of its results."""
    repo = TESTS.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(TESTS)])}
    out = subprocess.run([sys.executable, "-c", script, str(root), str(trials), str(seed)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
