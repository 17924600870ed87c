"""Does a planned configuration fit the memory it was planned for? (maml.training.planning)

On a CUDA GPU: builds the planned network, runs training steps (AMP, the mutual-learning loss, deep
supervision, Adam) at the planned patch and batch size and reports the peak allocated memory
against the plan's GPU memory target. nnU-Net's own reference (560M counted elements per 8 GB at
batch 2) trains in about 10 GB, so a peak up to 1.25 x the target is the expected margin.

Without CUDA: the activations autograd keeps (``saved_tensors_hooks``) for P phases over one phase,
measured at small sizes, against the planner's estimate of that ratio.

    python benchmarks/plan_memory.py --plans plans.json [--steps 3]
    python benchmarks/plan_memory.py                     # the CPU ratio check
"""

from __future__ import annotations

import argparse
import json


def gpu_peak(plans_path: str, steps: int) -> None:
    import torch

    from maml.config import ModelConfig
    from maml.network import MAMLNet
    from maml.training.losses import MutualLearningLoss

    plans = json.loads(open(plans_path).read())
    config = ModelConfig.from_dict(plans["model_config"])
    batch = plans["training_options"]["batch_size"]
    net = MAMLNet(config).cuda().to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(net.parameters(), 3e-4)
    loss_fn = MutualLearningLoss(deep_supervision=config.network.deep_supervision)
    scaler = torch.amp.GradScaler("cuda")
    shape = (batch, len(config.phases), *config.patch_size)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        image = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last_3d)
        target = torch.randint(0, config.num_classes, (batch, 1, *config.patch_size), device="cuda")
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            total = loss_fn(net(image), target).total
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1024 ** 3
    target_gb = plans["budget"].get("gpu_memory_gb")
    print(f"patch {config.patch_size} x batch {batch}, {len(config.phases)} phases: peak "
          f"{peak:.2f} GB allocated; planned for {target_gb} GB "
          f"(ratio {peak / target_gb:.2f})" if target_gb else f"peak {peak:.2f} GB (a CPU plan)")


def cpu_ratio() -> None:
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
    from engine_helpers import tiny_config
    from maml.network import MAMLNet
    from maml.training.planning import estimate_elements, features_per_stage, pool_and_conv_props

    torch.set_num_threads(1)
    for base, patch in ((16, [16, 32, 32]), (32, [32, 64, 64]), (32, [64, 64, 64])):
        topology = pool_and_conv_props([1.0, 1.0, 1.0], patch)
        features = features_per_stage(len(topology.strides), base)
        measured = {}
        for phases in (("venous",), ("arterial", "venous")):
            config = tiny_config(phases=phases, base_features=base, deep_supervision=False)
            config.patch_size = patch
            config.network.kernel_sizes, config.network.strides = topology.kernel_sizes, topology.strides
            storages = {}

            def pack(tensor):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                MAMLNet(config).train()(torch.randn(1, len(phases), *patch))
            measured[len(phases)] = sum(storages.values())
        estimated = (estimate_elements(patch, topology, features, 2, 3)
                     / estimate_elements(patch, topology, features, 1, 3))
        print(f"base {base}, patch {patch}: two phases / one, measured {measured[2] / measured[1]:.3f}, "
              f"estimated {estimated:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", help="a plans file from maml plan (needs CUDA)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.plans:
        gpu_peak(args.plans, args.steps)
    else:
        cpu_ratio()


if __name__ == "__main__":
    main()
