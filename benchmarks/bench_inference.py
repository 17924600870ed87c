"""MAML sliding-window inference (torch and OpenVINO backends) against MONAI's, in one run.

Same network (two phases, base 16 features, the paper's depth), same patch, overlap 0.5 and
Gaussian blending, on a 192x192x96 volume. Each run is its own process, so its peak memory (max RSS)
is its own; the methods alternate for --rounds rounds and the fastest run of each counts, so a
passing load on the machine hits all alike.

Speed is also given as GFLOP/s (the network's floating-point operations, counted by
torch.utils.flop_counter.FlopCounterMode, over the wall time) and as a share of the machine's FP32
peak, measured in the same run by a float32 matmul probe (the best of several large matmuls), not
assumed. The OpenVINO network is converted before the rounds (its cache, as after a first run);
the rounds time compiling it from the cache plus inference.

The last two lines are for other tools: ``ratio MAML(openvino)/MONAI: X`` (target <= 0.5) and
``FP32 peak share: Y %`` (the OpenVINO sliding-window run; target >= 60 %).

    python benchmarks/bench_inference.py [--size 96 192 192] [--patch 64 128 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time

METHODS = ("monai", "torch", "openvino")


def build_network():
    import torch

    from maml.config import paper_config
    from maml.network import MAMLNet

    config = paper_config()
    config.network.base_features = 16
    torch.manual_seed(0)
    return MAMLNet(config).eval()


def run_method(method: str, size, patch, threads: int, queue) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    net = build_network()
    data = np.random.default_rng(0).normal(size=(2, *size)).astype(np.float32)
    start = time.perf_counter()
    if method in ("torch", "openvino"):
        from maml.backends import OpenVINONetwork
        from maml.inference import SlidingWindowOptions, sliding_window_predict

        runner = OpenVINONetwork(net, "bench-inference") if method == "openvino" else net
        probabilities = sliding_window_predict(
            runner, data, net.phases,
            SlidingWindowOptions(patch, overlap=0.5, batch_size=2, device="cpu")).probabilities
    else:
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():
            probabilities, _ = sliding_window_inference(
                torch.from_numpy(data)[None], roi_size=patch, sw_batch_size=2,
                predictor=lambda x: tuple(net.predict(x)[:2]), overlap=0.5, mode="gaussian",
                sigma_scale=0.125, padding_mode="constant")
        probabilities = probabilities[0].numpy()
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    queue.put((method, seconds, peak_gb, probabilities.argmax(0)))


def prepare(patch, threads: int, queue) -> None:
    """In a process of its own: FLOPs of one window, the OpenVINO conversion (into the cache) and the
    network alone on one window in each backend (the best of three)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from maml.backends import OpenVINONetwork

    torch.set_num_threads(threads)
    net = build_network()
    window = torch.randn(1, 2, *patch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.predict(window)
    start = time.perf_counter()
    compiled = OpenVINONetwork(net, "bench-inference")
    compiled.prepare(net.phases, window.shape[1:])
    convert_s = time.perf_counter() - start
    alone = {}
    for name, runner in (("torch", net), ("openvino", compiled)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            with torch.inference_mode():
                runner.predict(window)
            times.append(time.perf_counter() - start)
        alone[name] = min(times)
    queue.put((counter.get_total_flops(), convert_s, alone))


def matmul_peak(threads: int, queue, n: int = 4096, repeats: int = 5) -> None:
    """The machine's FP32 peak as this process sees it: the best of float32 n x n matmuls."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    queue.put(2 * n**3 / best / 1e9)


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def in_process(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def window_count(size, patch) -> int:
    from maml.inference import window_starts

    count = 1
    for s, p in zip(size, patch):
        count *= len(window_starts(max(s, p), p, 0.5))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[96, 192, 192], help="volume (z y x)")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128], help="patch (z y x)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all)")
    args = parser.parse_args()
    # The converted network goes to a cache of this run, not the user's.
    os.environ.setdefault("MAML_CACHE", tempfile.mkdtemp(prefix="maml-bench-cache-"))

    flops, convert_s, alone = in_process(prepare, args.patch, args.threads)
    print(f"one {args.patch} window: {flops / 1e9:.1f} GFLOP; OpenVINO conversion (first run only) "
          f"{convert_s:.1f} s")
    peaks = [in_process(matmul_peak, args.threads)]
    results = {}
    for round_index in range(args.rounds):
        for method in METHODS:
            name, seconds, peak_gb, labels = in_process(run_method, method, args.size, args.patch,
                                                        args.threads)
            print(f"round {round_index + 1}: {name:8s} {seconds:8.2f} s   peak memory {peak_gb:5.2f} GB")
            best = results.get(name)
            results[name] = (min(seconds, best[0]) if best else seconds,
                             max(peak_gb, best[1]) if best else peak_gb, labels)
        peaks.append(in_process(matmul_peak, args.threads))
    peak = max(peaks)

    windows = window_count(args.size, args.patch)
    total = flops * windows
    print(f"volume {args.size} (z y x), patch {args.patch}, overlap 0.5, two phases, base 16, "
          f"{windows} windows, {args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    print(f"FP32 peak (float32 matmul probe, best of {len(peaks)}): {peak:.1f} GFLOP/s")
    for name, seconds in alone.items():
        rate = flops / seconds / 1e9
        print(f"network alone, one window, {name:8s}: {seconds:6.2f} s  {rate:6.1f} GFLOP/s  "
              f"{100 * rate / peak:5.1f} % of peak")
    for name in METHODS:
        seconds, peak_gb, _ = results[name]
        rate = total / seconds / 1e9
        print(f"sliding window, {name:8s}: {seconds:7.2f} s  {rate:6.1f} GFLOP/s  "
              f"{100 * rate / peak:5.1f} % of peak  peak memory {peak_gb:.2f} GB")
    for name in ("torch", "openvino"):
        agreement = (results[name][2] == results["monai"][2]).mean()
        print(f"labels MAML({name}) vs MONAI: {agreement:.4%} of voxels agree")
    print(f"ratio MAML(torch)/MONAI: {results['torch'][0] / results['monai'][0]:.2f} (target <= 1.0)")
    print(f"ratio MAML(openvino)/MONAI: {results['openvino'][0] / results['monai'][0]:.2f}")
    print(f"FP32 peak share: {100 * total / results['openvino'][0] / 1e9 / peak:.1f} %")


if __name__ == "__main__":
    main()
