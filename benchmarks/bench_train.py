"""Training speed: batch assembly vs the train step, our selective scan vs a naive loop, and (on a GPU) the
``seed`` preset in bf16 with our scan and with mamba-ssm's kernels plus model FLOPs utilisation.

    python benchmarks/bench_train.py [--cache DIR] [--json PATH] [--steps N] [--peak-tflops X]

FLOPs of one train step (forward + backward) are counted by ``torch.utils.flop_counter.FlopCounterMode`` on
the pure-PyTorch path (matmuls, attention, convolutions; the selective scan's elementwise work is not
counted, so MFU is a slight underestimate). MFU = counted FLOPs / step time / the device's dense bf16 peak:
from ``--peak-tflops`` or the table :data:`PEAK_BF16_TFLOPS` by device name; without either it is skipped
with a line saying so. Without CUDA every GPU figure is skipped with a line saying so; without mamba-ssm
(``pip install '.[gpu]'``) the mamba-ssm figure is skipped the same way.

Needs a tensor cache (``make demo`` builds the demo one; default: the latest under $RETAILSIM_DATA_DIR).
Prints a table and a final ``RESULT`` line; ``--json`` writes the same figures. The CPU target: batch
assembly ≥ 10× faster than the train step, so training is never data-bound.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from retailsim_pipeline.config import DataPaths, data_root, training_preset
from retailsim_pipeline.model.losses import WorldModelLoss
from retailsim_pipeline.model.mamba import HAS_MAMBA_SSM, selective_scan, selective_scan_ref
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.training.batches import BatchAssembler
from retailsim_pipeline.training.trainer import _optimizer, build_model


#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of ``torch.cuda.get_device_name()``.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "RTX 4090": 165.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def _timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_assembly(cache: TensorCache, batch_size: int, n_batches: int) -> float:
    data = BatchAssembler(cache, "train", batch_size=batch_size, seed=0, shuffle_lines=True)  # as training
    batches = data.epoch_batches(0)[:n_batches]
    t = time.perf_counter()
    n = 0
    for i, idx in enumerate(batches):
        n += len(data.assemble(idx, mask_prob=0.15, mask_seed=(0, 0, i)))
    return n / (time.perf_counter() - t)


def bench_steps(cache: TensorCache, preset: str, steps: int, device: torch.device, *, bf16: bool,
                fast_path: bool = False) -> dict:
    """Samples/s of ``steps`` optimizer steps, and the FLOPs of one step counted on the pure-PyTorch path.
    ``fast_path``: mamba-ssm's fused kernels (CUDA with mamba-ssm installed) instead of our scan."""
    config = training_preset(preset)
    model = build_model(config, cache).to(device).train()
    for module in model.modules():
        if hasattr(module, "use_fast_path"):
            module.use_fast_path = fast_path
    opt = _optimizer(model, config)
    for g in opt.param_groups:
        g["lr"] = config.lr_main
    loss_fn = WorldModelLoss(config)
    data = BatchAssembler(cache, "train", batch_size=config.batch_size, seed=0, shuffle_lines=config.shuffle_lines)
    batches = [data.assemble(idx, mask_prob=0.15, mask_seed=(0, 0, i)).to(device)
               for i, idx in enumerate(data.epoch_batches(0)[: steps + 2])]

    def step(batch):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            out = model(**batch.model_inputs(), predict_mask=batch.predict_mask)
            total, _ = loss_fn(out, batch, "main")
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:
        step(b)
    flops = None
    if not fast_path:  # the fused kernels are opaque to the counter
        with FlopCounterMode(display=False) as counter:
            step(batches[0])
        flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = 0
    for b in batches[2:]:
        step(b)
        n += len(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {"samples_per_s": n / seconds, "seconds_per_step": seconds / steps, "batch_size": config.batch_size,
            "flops_per_step": flops, "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def bench_scan(device: torch.device) -> dict:
    torch.manual_seed(0)
    b, d, n, length = (64, 256, 16, 50) if device.type == "cpu" else (256, 1024, 16, 50)
    u = torch.randn(b, d, length, device=device)
    delta = torch.randn(b, d, length, device=device) * 0.5
    a = -torch.rand(d, n, device=device) - 0.5
    bb = torch.randn(b, n, length, device=device)
    cc = torch.randn(b, n, length, device=device)
    dd = torch.randn(d, device=device)
    z = torch.randn(b, d, length, device=device)
    kwargs = dict(D=dd, z=z, delta_softplus=True)
    ours = _timeit(lambda: selective_scan(u, delta, a, bb, cc, **kwargs), 3)
    naive = _timeit(lambda: selective_scan_ref(u, delta, a, bb, cc, **kwargs), 2)
    return {"shape": [b, d, n, length], "ours_s": ours, "naive_s": naive, "speedup": naive / ours}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    args = p.parse_args()
    cache = TensorCache.open(Path(args.cache)) if args.cache else TensorCache.latest(DataPaths(data_root()).cache)
    cpu = torch.device("cpu")
    result: dict = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                                "mamba_ssm": HAS_MAMBA_SSM}, "cache": str(cache.path)}
    assembly = bench_assembly(cache, 256, 60)
    steps = bench_steps(cache, "demo", args.steps, cpu, bf16=False)
    scan = bench_scan(cpu)
    result["cpu"] = {"assembly_samples_per_s": assembly, "demo_step": steps, "scan": scan,
                     "assembly_over_step": assembly / steps["samples_per_s"]}
    cpu_tflops = steps["flops_per_step"] / steps["seconds_per_step"] / 1e12
    result["cpu"]["achieved_tflops"] = cpu_tflops
    rows = [
        (f"batch assembly (batch 256, train split of {len(cache.split('train')):,} baskets)",
         f"{assembly:,.0f} samples/s"),
        (f"demo train step on CPU ({steps['parameters']:,} params)", f"{steps['samples_per_s']:,.0f} samples/s "
         f"({steps['seconds_per_step'] * 1000:.0f} ms/step)"),
        ("demo train step FLOPs (counted)", f"{steps['flops_per_step'] / 1e9:,.1f} GFLOP/step, "
         f"{cpu_tflops * 1000:,.1f} GFLOP/s achieved"),
        ("assembly / step", f"×{assembly / steps['samples_per_s']:.0f}  (target ≥ ×10)"),
        (f"selective scan {scan['shape']} ours vs naive loop", f"{scan['ours_s'] * 1000:.1f} ms vs "
         f"{scan['naive_s'] * 1000:.1f} ms (×{scan['speedup']:.1f})"),
    ]
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        name = torch.cuda.get_device_name()
        seed_ours = bench_steps(cache, "seed", args.steps, gpu, bf16=True)
        result["gpu"] = {"device": name, "seed_step_ours": seed_ours, "scan": bench_scan(gpu)}
        rows.append(("seed preset bf16, our scan", f"{seed_ours['samples_per_s']:,.0f} samples/s "
                     f"({seed_ours['seconds_per_step'] * 1000:.0f} ms/step)"))
        if HAS_MAMBA_SSM:
            seed_fast = bench_steps(cache, "seed", args.steps, gpu, bf16=True, fast_path=True)
            result["gpu"]["seed_step_mamba_ssm"] = seed_fast
            rows.append(("seed preset bf16, mamba-ssm kernels", f"{seed_fast['samples_per_s']:,.0f} samples/s "
                         f"(×{seed_fast['samples_per_s'] / seed_ours['samples_per_s']:.2f} ours)"))
        else:
            rows.append(("seed preset bf16, mamba-ssm kernels", "skipped: mamba-ssm not installed "
                         "(pip install '.[gpu]')"))
        peak = args.peak_tflops or peak_tflops(name)
        if peak is None:
            rows.append(("MFU", f"skipped: no bf16 peak known for {name!r}; pass --peak-tflops"))
        else:
            achieved = seed_ours["flops_per_step"] / seed_ours["seconds_per_step"] / 1e12
            result["gpu"].update(achieved_tflops=achieved, peak_tflops=peak, mfu=achieved / peak)
            rows.append(("MFU, seed preset bf16, our scan", f"{achieved / peak:.1%} ({achieved:.1f} of {peak:g} "
                         "TFLOP/s)"))
    else:
        rows.append(("GPU figures (seed bf16, mamba-ssm, MFU)", "skipped: no CUDA device here"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    line = (f"RESULT assembly_samples_per_s={assembly:.0f} cpu_step_samples_per_s={steps['samples_per_s']:.0f} "
            f"assembly_over_step={assembly / steps['samples_per_s']:.1f} scan_speedup={scan['speedup']:.1f}")
    if "gpu" in result:
        line += f" seed_gpu_samples_per_s={result['gpu']['seed_step_ours']['samples_per_s']:.0f}"
        if "mfu" in result["gpu"]:
            line += f" mfu={result['gpu']['mfu']:.3f}"
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
