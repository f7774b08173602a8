#!/usr/bin/env python3
"""Runs the README's main command verbatim, as a newcomer would, and checks its answer.

Takes the command from the README's "Run the main job" block and the example request from the
block after "Then, from another shell:", starts the first in its own process group on this
checkout, waits for GET /health (the first release build is part of the wait), runs the second,
checks the answer (HTTP 200, the capital of France named, and the `caps` adapter's style: Title
Case, at least 80% of the words capitalised), prints how long the build and the first answer took, and stops the server.
Exits non-zero, with the server's log tail, on any failure.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
HEALTH = "http://127.0.0.1:8000/health"
START_TIMEOUT_S = 45 * 60


def block_after(text, marker):
    """The first ```sh block after `marker`, as one shell command (continuations joined)."""
    at = text.find(marker)
    if at < 0:
        sys.exit(f"README.md has no {marker!r}")
    m = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    if not m:
        sys.exit(f"README.md has no ```sh block after {marker!r}")
    return m.group(1).strip()


def healthy():
    try:
        with urllib.request.urlopen(HEALTH, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main():
    text = open(README, encoding="utf-8").read()
    serve = block_after(text, "Run the main job")
    request = block_after(text, "Then, from another shell:")
    if healthy():
        sys.exit("something already answers on 127.0.0.1:8000; stop it first")
    print("README main command:", serve, flush=True)
    log_path = os.path.join(ROOT, "target", "readme-main-command.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "wb")
    started = time.time()
    proc = subprocess.Popen(["bash", "-c", serve], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def fail(why):
        stop(proc)
        tail = open(log_path, "rb").read()[-4000:].decode("utf-8", "replace")
        sys.exit(f"FAILED: {why}\n--- server log (tail) ---\n{tail}")

    while not healthy():
        if proc.poll() is not None:
            fail(f"the main command exited with status {proc.returncode} before serving")
        if time.time() - started > START_TIMEOUT_S:
            fail(f"not serving after {START_TIMEOUT_S} s")
        time.sleep(1)
    up = time.time() - started
    print(f"serving after {up:.0f} s (build and start)", flush=True)
    asked = time.time()
    out = subprocess.run(["bash", "-c", request + " -w '\\n%{http_code}'"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    answered = time.time() - asked
    body, _, code = out.stdout.rpartition("\n")
    if out.returncode != 0 or code.strip() != "200":
        fail(f"the README's request got status {code.strip()!r} (curl exit {out.returncode}): {out.stdout}{out.stderr}")
    try:
        answer = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError) as e:
        fail(f"the README's request did not get a chat completion ({e}): {body}")
    print(f"first answer after {answered:.1f} s: {answer!r}", flush=True)
    if "paris" not in answer.lower():
        fail(f"the answer does not name Paris: {answer!r}")
    words = [w for w in answer.split() if re.match(r"[^\w\s]*[A-Za-z]", w)]
    if not words or sum(bool(re.match(r"[^\w\s]*[A-Z]", w)) for w in words) < 0.8 * len(words):
        fail(f"the answer is not in the caps adapter's style (Title Case: 80% of words capitalised): {answer!r}")
    stop(proc)
    print("ok: the README's main command serves, and its example request answers correctly")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main()
