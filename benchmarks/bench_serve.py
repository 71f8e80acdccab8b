"""``zimagekit serve`` under load: N concurrent clients on the A1111 API against calling the
pipeline directly, on the shipped shapes Turbo (64x64, 8 steps).

    python benchmarks/bench_serve.py [--clients 8] [--requests 5] [--threads 2]

Each client sends ``--requests`` txt2img requests one after another, each with its own seed;
all clients start together. Reported: requests per second over the whole run, p50/p95
latency of a request (queueing included), and the same images drawn by calling the pipeline
directly in one loop (no HTTP, no queue). Every response's PNG metadata must name the seed it
was asked for, once: no job lost, none duplicated.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serve import TURBO, Server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import httpx
    from PIL import Image

    from zimagekit.cli.serve import build
    from zimagekit.pipeline import ZImagePipeline

    app = build(Namespace(model=TURBO, lora_dir=None, output_dir=None, dtype="fp32", device="cpu", max_side=256,
                          max_steps=100, max_images=4, api_key=None))
    seeds = [[1000 * c + r for r in range(args.requests)] for c in range(args.clients)]
    latencies, got, errors = [], [], []
    lock = threading.Lock()

    with Server(app) as url:
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 0}, timeout=60)  # warm-up

        def client(mine):
            with httpx.Client(timeout=600) as http:
                for seed in mine:
                    start = time.perf_counter()
                    r = http.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": seed})
                    elapsed = time.perf_counter() - start
                    with lock:
                        if r.status_code != 200:
                            errors.append(r.text)
                            continue
                        latencies.append(elapsed)
                        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
                        got.append(int(image.text["parameters"].split("Seed: ")[1].split(",")[0]))

        threads = [threading.Thread(target=client, args=(mine,)) for mine in seeds]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = time.perf_counter() - start

    pipe = app.state.generator.pipe
    assert isinstance(pipe, ZImagePipeline)
    start = time.perf_counter()
    for mine in seeds:
        for seed in mine:
            pipe("a red circle", seed=seed, progress=False)
    direct = time.perf_counter() - start

    wanted = sorted(s for mine in seeds for s in mine)
    n = len(wanted)
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    print(f"\n{args.clients} clients x {args.requests} requests = {n} images, shapes-turbo 64x64 8 steps, fp32, "
          f"{args.threads} threads")
    print("| | requests/s | p50 latency | p95 latency |")
    print("|---|---|---|---|")
    print(f"| zimagekit serve, A1111 txt2img | {n / served:.2f} | {statistics.median(latencies):.3f} s | {q[18]:.3f} s |")
    print(f"| pipeline called directly, one loop | {n / direct:.2f} | {direct / n:.3f} s | - |")
    print(f"\nserver / direct throughput: {direct / served:.2f}; errors: {len(errors)}; "
          f"every seed answered once: {sorted(got) == wanted}")
    if errors or sorted(got) != wanted:
        sys.exit("error: lost, failed or duplicated jobs")


if __name__ == "__main__":
    main()
