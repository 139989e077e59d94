"""``gridfeats serve`` as a user runs it: a separate process, configured by flags and environment,
stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import free_port, image_bytes
from tests.service.test_service_model import CONFIG, OPTS

REPO = Path(__file__).resolve().parents[2]


def _serve(args, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "gridfeats", "serve", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became ready")


def test_serve_answers_then_drains_and_exits_cleanly_on_sigterm():
    port = free_port()
    process = _serve(
        ["--config", CONFIG, "--port", str(port), "--max-wait-ms", "1", *OPTS],
        env_extra={"GRIDFEATS_MAX_BATCH": "3", "GRIDFEATS_API_KEYS": "cli-secret"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        info = httpx.get(url + "/v1/model", headers={"x-api-key": "cli-secret"}).json()
        assert info["config"] == CONFIG and info["max_batch"] == 3  # from the environment
        assert httpx.get(url + "/v1/model").status_code == 401  # keys from GRIDFEATS_API_KEYS
        response = httpx.post(
            url + "/v1/features",
            content=image_bytes(50, 40),
            timeout=60,
            headers={
                "content-type": "image/png",
                "accept": "application/x-npy",
                "x-api-key": "cli-secret",
            },
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-npy"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [
        line for line in lines if line.get("event") == "access" and line["path"] == "/v1/features"
    ]
    assert access and access[-1]["status"] == 200 and access[-1]["images"] == 1
    assert "cli-secret" not in stderr


def test_serve_exits_with_an_error_when_the_model_cannot_load(tmp_path):
    weights = tmp_path / "broken.pth"
    weights.write_bytes(b"this is not a checkpoint")
    process = _serve(
        ["--config", CONFIG, "--weights", str(weights), "--port", str(free_port()), *OPTS]
    )
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert (
        "model failed to load" in stderr
        and "Traceback (most recent call last)" not in stderr.split("\n")[-2]
    )


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--max-batch", "0"], "max_batch"),
        (["--config", "no-such-config"], "config:"),
        (["--api-keys-file", "/nonexistent/keys"], "api_keys_file: file not found"),
    ],
)
def test_bad_settings_exit_2_with_one_line(args, phrase):
    process = _serve(args)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert phrase in stderr
    assert "Traceback" not in stderr
