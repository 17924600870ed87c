"""How well the out-of-distribution check separates: false alarms on unseen phantoms, refusals of
inputs unlike the training data.

    python benchmarks/domain_check.py --model MODEL --in-distribution PHANTOMS [--ood-from CASE_DIR]
        --out benchmarks/results/domain_check.json [--shard K/N, then --merge the shards' files]

In distribution: every case of a phantom data set from seeds never used in training or for the
thresholds (both phases, the default deformable registration, as `maml segment` runs them): each
should come out "ok". Out of distribution: the variants of Testing/ood_cases.py made from the
bundled sample case's venous phase, each run alone; each should be refused, and the feature distance
alone should refuse most of them. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MAMLSegmentation"))
sys.path.insert(0, str(ROOT / "Testing"))


def run_case(images, model, accept=True) -> dict:
    """The domain report of one run; accepted, so every check is measured (nothing written)."""
    from maml.errors import MAMLError
    from maml.pipeline import SegmentOptions, segment

    started = time.perf_counter()
    try:
        result = segment(images, model, SegmentOptions(accept_out_of_distribution=accept))
    except MAMLError as error:  # e.g. the memory check, which no flag overrides
        return {"status": "error", "message": str(error), "seconds": time.perf_counter() - started}
    domain = result.stats["domain_check"]
    refused = [c["name"] for c in domain["checks"] if c["status"] == "refused"]
    warned = [c["name"] for c in domain["checks"] if c["status"] == "warning"]
    features = {c["name"]: c["value"] for c in domain["checks"] if "feature_distance" in c["name"]}
    would_refuse = bool(refused)
    return {"status": "refused" if would_refuse else domain["status"], "refused_by": refused,
            "warned_by": warned, "feature_distance": features,
            "features_alone_refuse": any("feature_distance" in name for name in refused),
            "tumor_count": result.stats["tumor_count"],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--in-distribution", help="phantom data set (nnU-Net raw layout) of unseen seeds")
    parser.add_argument("--ood-from", default=str(ROOT / "MAMLSegmentation/Resources/SampleData"),
                        help="folder with phantom_venous.nrrd and phantom_truth.nrrd")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="run every N-th in-distribution case from the K-th, and the "
                             "out-of-distribution variants only in shard 0 (to use several cores)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine shards' results into --out")
    args = parser.parse_args()
    if args.merge:
        write(merge([json.loads(Path(p).read_text()) for p in args.merge]), args.out)
        return
    shard, shards = (int(v) for v in args.shard.split("/"))

    import torch

    from maml.training.dataset import read_dataset
    from maml.model import load_model

    torch.set_num_threads(1)
    model = load_model(args.model)
    results = {"model": args.model, "model_sha256": model.sha256, "host": platform.node(),
               "command": " ".join(sys.argv), "in_distribution": {}, "out_of_distribution": {}}
    if args.in_distribution:
        dataset = read_dataset(args.in_distribution)
        for case in dataset.cases[shard::shards]:
            images = dict(zip(model.config.phases, map(str, dataset.image_files(case))))
            results["in_distribution"][case] = row = run_case(images, model)
            print(f"{case:28s} {row['status']:8s} {row.get('warned_by', '')} "
                  f"{row.get('feature_distance', '')}", flush=True)
    if shard == 0:
        run_variants(Path(args.ood_from), model, results)
    write(results, args.out)


def run_variants(folder: Path, model, results: dict) -> None:
    import SimpleITK as sitk

    import ood_cases

    venous = sitk.ReadImage(str(folder / "phantom_venous.nrrd"))
    truth = sitk.ReadImage(str(folder / "phantom_truth.nrrd"))
    results["out_of_distribution"]["original (venous alone)"] = run_case({"venous": venous}, model)
    for name, image in ood_cases.variants(venous, truth).items():
        results["out_of_distribution"][name] = row = run_case({"venous": image}, model)
        print(f"{name:28s} {row['status']:8s} {row.get('refused_by', row.get('message'))}", flush=True)


def merge(parts: list[dict]) -> dict:
    merged = dict(parts[0], in_distribution={}, out_of_distribution={})
    merged["command"] = [part["command"] for part in parts]
    for part in parts:
        merged["in_distribution"].update(part["in_distribution"])
        merged["out_of_distribution"].update(part["out_of_distribution"])
    return merged


def write(results: dict, out: str) -> None:
    ind = results["in_distribution"].values()
    ood = [r for name, r in results["out_of_distribution"].items() if not name.startswith("original")]
    results["summary"] = {
        "in_distribution_cases": len(ind),
        "false_alarms": sum(r["status"] != "ok" for r in ind),
        "out_of_distribution_cases": len(ood),
        "refused": sum(r["status"] in ("refused", "error") for r in ood),
        "refused_by_feature_distance_alone": sum(r.get("features_alone_refuse", False) for r in ood),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"]))


if __name__ == "__main__":
    main()
