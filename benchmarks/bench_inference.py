"""MAML sliding-window inference against MONAI's sliding_window_inference, in one run.

Same network (two phases, base 16 features, the paper's depth), same patch, overlap 0.5 and
Gaussian blending, on a 192x192x96 volume. Each run is its own process, so its peak memory (max RSS)
is its own; the methods alternate for --rounds rounds and the fastest run of each counts, so a
passing load on the machine hits both alike. Prints both times, their ratio (MAML / MONAI; target
<= 1.0) and peak memory (target < 3 GB).

    python benchmarks/bench_inference.py [--size 96 192 192] [--patch 64 128 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def build_network():
    import torch

    from maml.config import paper_config
    from maml.network import MAMLNet

    config = paper_config()
    config.network.base_features = 16
    torch.manual_seed(0)
    return MAMLNet(config).eval()


def run_method(method: str, size, patch, queue) -> None:
    import numpy as np
    import torch

    net = build_network()
    data = np.random.default_rng(0).normal(size=(2, *size)).astype(np.float32)
    start = time.perf_counter()
    if method == "maml":
        from maml.inference import SlidingWindowOptions, sliding_window_predict

        probabilities = sliding_window_predict(
            net, data, net.phases,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[96, 192, 192], help="volume (z y x)")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128], help="patch (z y x)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = {}
    for round_index in range(args.rounds):
        for method in ("monai", "maml"):
            queue = context.Queue()
            process = context.Process(target=run_method, args=(method, args.size, args.patch, queue))
            process.start()
            name, seconds, peak_gb, labels = queue.get()
            process.join()
            print(f"round {round_index + 1}: {name:6s} {seconds:8.2f} s   peak memory {peak_gb:5.2f} GB")
            best = results.get(name)
            results[name] = (min(seconds, best[0]) if best else seconds,
                             max(peak_gb, best[1]) if best else peak_gb, labels)

    agreement = (results["maml"][2] == results["monai"][2]).mean()
    ratio = results["maml"][0] / results["monai"][0]
    print(f"volume {args.size} (z y x), patch {args.patch}, overlap 0.5, two phases, base 16")
    print(f"time ratio MAML / MONAI: {ratio:.2f} (target <= 1.0)")
    print(f"label agreement: {agreement:.4%}")
    print(f"MAML peak memory {results['maml'][1]:.2f} GB (target < 3 GB)")


if __name__ == "__main__":
    main()
