"""Benchmark of ``gridfeats serve``: throughput and latency over HTTP versus the model in-process.

For each batching setting (on: ``--max-batch B``; off: ``--max-batch 1``) a real server process is
started, and closed-loop clients (each sends its next request as soon as the previous answer
arrived) run at each concurrency level. The reference is the same model called directly in this
process -- the service's own backend, built from the same settings (so the same fast kernels and
the same per-image or ``--batched-forward`` forwards) -- with the batch size the server could form
(1 without batching, ``min(concurrency, B)`` with it), on the same image bytes, measured twice:

- ``direct``: bytes -> decode + resize -> features, i.e. the work the server does for a request,
  minus HTTP;
- ``forward``: features from already decoded and resized images, the model alone.

Served and in-process runs alternate (``--rounds`` pairs per level, medians reported) and never
overlap, so they do not compete for the CPU and a change of load on a shared machine hits both.
Images are synthetic scenes, all brought to one size so that batched forwards really share a
forward (the detector groups a batch by input size). Results are printed as a table; ``--json``
also writes them.

    .venv/bin/python benchmarks/serve.py                      # defaults: R-50-grid, 224 px inputs
    .venv/bin/python benchmarks/serve.py --requests 128 --rounds 5 --min-size 600 --max-size 1000
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gridfeats.data.synthetic import make_synthetic  # noqa: E402
from gridfeats.data.transforms import resize_uint8  # noqa: E402


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="R-50-grid")
    p.add_argument("--weights", default=None)
    p.add_argument(
        "--min-size", type=int, default=224, help="INPUT.MIN_SIZE_TEST for server and direct runs"
    )
    p.add_argument("--max-size", type=int, default=373, help="INPUT.MAX_SIZE_TEST")
    p.add_argument("--image-size", default="480x360", help="WxH of the benchmark images")
    p.add_argument("--images", type=int, default=16, help="distinct images, cycled by the clients")
    p.add_argument("--requests", type=int, default=64, help="requests per run")
    p.add_argument(
        "--rounds", type=int, default=3, help="served/direct run pairs per level (medians reported)"
    )
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--batched-forward",
        action="store_true",
        help="one forward per batch (server and direct runs) instead of one per image",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- images
def benchmark_images(count: int, size: str) -> List[bytes]:
    """JPEG bytes of synthetic scenes, all resized to one size."""
    width, height = (int(v) for v in size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp, count, seed=11)
        out = []
        for path in sorted((Path(tmp) / "images").iterdir()):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            buffer = io.BytesIO()
            Image.fromarray(resize_uint8(rgb, height, width)).save(
                buffer, format="JPEG", quality=90
            )
            out.append(buffer.getvalue())
    return out


# ------------------------------------------------------------------------------------- direct
def model_opts(args: argparse.Namespace) -> List[str]:
    return ["INPUT.MIN_SIZE_TEST", str(args.min_size), "INPUT.MAX_SIZE_TEST", str(args.max_size)]


def service_settings(args: argparse.Namespace, max_batch: int):
    from service.settings import ServiceSettings

    return ServiceSettings(
        config=args.config,
        weights=args.weights,
        opts=tuple(model_opts(args)),
        batched_forward=args.batched_forward,
        max_batch=max_batch,
    )


class DirectModel:
    """The service's backend in this process: the reference the server is compared with.

    Its calls run in one dedicated worker thread, as the server runs its model. This matters more
    than it seems: on a loaded 2-core machine torch's intra-op thread pool made forwards called from
    the main thread up to 10x slower than the same forwards called from a worker thread (measured
    while writing this benchmark), which would flatter the server.
    """

    def __init__(self, args: argparse.Namespace, images: List[bytes]) -> None:
        from service.backend import DetectorBackend, FeatureSpec

        self.images = images
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-model")
        if args.threads:
            import torch

            self.thread.submit(torch.set_num_threads, args.threads).result()
        self.backend = DetectorBackend.from_settings(service_settings(args, args.max_batch))
        self.spec = FeatureSpec("grid")
        self.prepared = [self.backend.prepare(data) for data in images]
        self.thread.submit(self._run, [0]).result()  # warm-up

    def _run(self, indices: Sequence[int], decode: bool = False) -> None:
        from service.backend import ModelRequest

        sources = [
            self.backend.prepare(self.images[i]) if decode else self.prepared[i] for i in indices
        ]
        self.backend.run_batch([ModelRequest(self.spec, p) for p in sources])

    def measure(self, batch: int, requests: int) -> Dict[str, float]:
        """Images/s at ``batch`` images per call: bytes -> features, and the forward alone."""
        return self.thread.submit(self._measure, batch, requests).result()

    def _measure(self, batch: int, requests: int) -> Dict[str, float]:
        batches = [
            [i % len(self.images) for i in range(start, min(start + batch, requests))]
            for start in range(0, requests, batch)
        ]
        started = time.perf_counter()
        for indices in batches:
            self._run(indices, decode=True)
        direct = requests / (time.perf_counter() - started)
        started = time.perf_counter()
        for indices in batches:
            self._run(indices)
        forward = requests / (time.perf_counter() - started)
        return {"direct_images_per_s": direct, "forward_images_per_s": forward}


# ------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``gridfeats serve`` in a child process, stopped with SIGTERM."""

    def __init__(self, args: argparse.Namespace, max_batch: int) -> None:
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "gridfeats",
            "serve",
            "--config",
            args.config,
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--max-queue",
            "4096",
            "--log-level",
            "warning",
        ]
        if args.weights:
            command += ["--weights", args.weights]
        if args.batched_forward:
            command += ["--batched-forward"]
        command += model_opts(args)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.log = tempfile.TemporaryFile(mode="w+")  # the server's stderr, shown if it fails
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stderr=self.log)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log.read()[-3000:]}"
                )
            try:
                if get(self.port, "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server never became ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self.log.close()


def get(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def batch_stats(port: int) -> Dict[str, float]:
    text = get(port, "/metrics")[1].decode()
    values = {}
    for line in text.splitlines():
        for name in ("gridfeats_batch_size_sum", "gridfeats_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values


def run_clients(
    port: int, images: List[bytes], concurrency: int, requests: int
) -> Dict[str, float]:
    """Closed-loop load: ``concurrency`` clients share ``requests`` requests; latencies in s."""
    latencies: List[float] = []
    errors = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        headers = {"Content-Type": "image/jpeg", "Accept": "application/x-npy"}
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            started = time.perf_counter()
            conn.request("POST", "/v1/features", body=images[index % len(images)], headers=headers)
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if response.status == 200 else errors).append(elapsed)
        conn.close()

    before = batch_stats(port)
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = batch_stats(port)
    batches = after["gridfeats_batch_size_count"] - before["gridfeats_batch_size_count"]
    ordered = sorted(latencies)
    return {
        "images_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))],
        "mean_batch": (after["gridfeats_batch_size_sum"] - before["gridfeats_batch_size_sum"])
        / max(1, batches),
        "errors": len(errors),
    }


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: the server child is stopped too


def main(argv: Sequence[str] = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    images = benchmark_images(args.images, args.image_size)
    print(
        f"{args.config}, inputs {args.min_size}/{args.max_size}, {len(images)} images of "
        f"{args.image_size}, {args.requests} requests per run, {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, {'batched' if args.batched_forward else 'per-image'} forwards",
        flush=True,
    )
    direct_model = DirectModel(args, images)

    rows = []
    for batching, max_batch in (("on", args.max_batch), ("off", 1)):
        server = ServerProcess(args, max_batch)
        try:
            server.wait_ready()
            run_clients(server.port, images, 2, 8)  # warm the connections and threads
            for concurrency in levels:
                batch = min(concurrency, max_batch)
                served_runs, direct_runs = [], []
                # Served and direct runs alternate, so a load change on the machine hits both.
                for _ in range(args.rounds):
                    served_runs.append(run_clients(server.port, images, concurrency, args.requests))
                    direct_runs.append(direct_model.measure(batch, args.requests))
                row = {"batching": batching, "concurrency": concurrency, "direct_batch": batch}
                for key in ("images_per_s", "p50_ms", "p99_ms", "mean_batch"):
                    row[key] = statistics.median(run[key] for run in served_runs)
                row["errors"] = sum(run["errors"] for run in served_runs)
                for key in ("direct_images_per_s", "forward_images_per_s"):
                    row[key] = statistics.median(run[key] for run in direct_runs)
                row["vs_direct"] = row["images_per_s"] / row["direct_images_per_s"]
                row["vs_forward"] = row["images_per_s"] / row["forward_images_per_s"]
                rows.append(row)
                print(
                    f"  batching={batching:<3s} c={concurrency:<3d} served "
                    f"{row['images_per_s']:7.2f} img/s (p50 {row['p50_ms']:.1f} ms, p99 "
                    f"{row['p99_ms']:.1f} ms, mean batch {row['mean_batch']:.2f}, errors "
                    f"{row['errors']})  direct batch {batch}: {row['direct_images_per_s']:.2f} "
                    "img/s",
                    flush=True,
                )
        finally:
            server.stop()

    print(
        "\nmedians over rounds; direct = the same backend in-process, same batch size, bytes -> "
        "features"
    )
    print(
        "batching  conc  img/s   p50 ms   p99 ms  p99/p50  mean batch  direct img/s  "
        "served/direct  served/forward"
    )
    for r in rows:
        print(
            f"{r['batching']:<9s} {r['concurrency']:>4d} {r['images_per_s']:6.2f} "
            f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['p99_ms'] / r['p50_ms']:8.2f} "
            f"{r['mean_batch']:11.2f} {r['direct_images_per_s']:13.2f} {r['vs_direct']:14.1%} "
            f"{r['vs_forward']:15.1%}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
