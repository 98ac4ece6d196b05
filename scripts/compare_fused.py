#!/usr/bin/env python3
"""Fused vs composed burn vs PyTorch CPU eager: KD losses, forward + backward, in one run.

Runs PyTorch on the same losses, conventions and shapes as `benches/benchmarks/fused.rs`, then
the criterion benches (`fused/...` and `bandwidth/copy/1GiB`), and prints one Markdown table
with the ratios and each fused figure as a share of the measured copy bandwidth (12 bytes per
element: read student and teacher logits, write the gradient).

    pip install torch numpy          # CPU wheels are enough
    python3 scripts/compare_fused.py                     # everything (about an hour on 2 cores)
    python3 scripts/compare_fused.py --devices flex --shapes 2048x32000
    python3 scripts/compare_fused.py --skip-cargo        # reuse criterion's last results
    # on a machine with an NVIDIA GPU (wgpu through Vulkan against PyTorch CUDA eager; the
    # wgpu rows' bandwidth share is then of the card's copy bandwidth, measured by torch):
    python3 scripts/compare_fused.py --devices wgpu --torch-device cuda --shapes 8192x32000,8192x128256 --losses forward_kl,hinton

PyTorch is used only here, never by the crates.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ["256x10", "256x1000", "2048x32000", "8192x32000"]
LOSSES = ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "hinton"]
# At 8192 x 32000 the composed paths (burn and PyTorch) only run these two.
HUGE_LOSSES = {"forward_kl", "hinton"}


def logits(rows, classes, seed):
    """The bench's deterministic logits: uniform in [-4, 4) from a 32-bit hash of (index, seed)."""
    mask = 0xFFFFFFFF
    x = ((torch.arange(rows * classes, dtype=torch.int64) + seed * 1_000_003) & mask) * 2_654_435_761 & mask
    x ^= x >> 15
    x = (x * 2_246_822_519) & mask
    x ^= x >> 13
    return ((x >> 8).to(torch.float32) / float(1 << 24) * 8.0 - 4.0).reshape(rows, classes)


def kl(log_a, log_b):
    """Sum over classes of a (log a - log b), rows averaged (batchmean)."""
    return F.kl_div(log_b, log_a, reduction="batchmean", log_target=True)


def loss_fn(name, student, teacher, labels):
    if name == "hinton":  # alpha 0.5, T 4, T^2 on: alpha CE + (1 - alpha) T^2 KL
        t = 4.0
        soft = kl(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1)) * t * t
        return 0.5 * F.cross_entropy(student, labels) + 0.5 * soft
    t = 2.0
    q = F.log_softmax(student / t, -1)
    p = F.log_softmax(teacher / t, -1)
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "generalized_jsd":  # beta 0.5, normalised by beta (1 - beta)
        beta = 0.5
        m = torch.logsumexp(torch.stack([p + torch.log(torch.tensor(beta)), q + torch.log(torch.tensor(1 - beta))]), 0)
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    if name == "total_variation":
        return 0.5 * (p.exp() - q.exp()).abs().sum(-1).mean()
    raise ValueError(name)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_torch(name, rows, classes, repeats, device):
    teacher = logits(rows, classes, 2).to(device)
    student_data = logits(rows, classes, 1).to(device)
    labels = ((torch.arange(rows) * 7919) % classes).to(device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        student = student_data.clone().requires_grad_(True)
        synchronize(device)
        start = time.perf_counter()
        loss_fn(name, student, teacher, labels).backward()
        _ = student.grad.sum().item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def device_copy_bandwidth(device, repeats=20):
    """Bytes read + written per second copying 1 GiB between two buffers on `device`."""
    source = torch.ones(1 << 28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * 4 * repeats / (time.perf_counter() - start)


def criterion_results(target):
    """{(group, function, value): median seconds, bytes} from criterion's JSON files."""
    results = {}
    for bench in (target / "criterion").rglob("new/benchmark.json"):
        meta = json.loads(bench.read_text())
        estimates = json.loads((bench.parent / "estimates.json").read_text())
        throughput = meta.get("throughput") or {}
        key = (meta["group_id"], meta["function_id"], meta.get("value_str"))
        results[key] = (estimates["median"]["point_estimate"] / 1e9, throughput.get("Bytes"))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="ndarray,flex", help="burn devices to bench (comma-separated)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--repeats", type=int, default=5, help="PyTorch repetitions per case (median)")
    parser.add_argument("--skip-cargo", action="store_true", help="do not run cargo bench; read its last results")
    parser.add_argument("--output", type=Path, help="also write the table here")
    parser.add_argument("--torch-device", default="cpu", help="where PyTorch runs: cpu or cuda")
    args = parser.parse_args()
    devices, shapes, losses = args.devices.split(","), args.shapes.split(","), args.losses.split(",")
    torch.set_num_threads(os.cpu_count())
    torch_device = torch.device(args.torch_device)
    gpu_bandwidth = device_copy_bandwidth(torch_device) if torch_device.type == "cuda" else None

    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, on {torch_device}", file=sys.stderr)
    torch_times = {}
    for shape in shapes:
        rows, classes = map(int, shape.split("x"))
        for name in losses:
            if rows * classes > 100_000_000 and name not in HUGE_LOSSES:
                continue
            repeats = args.repeats if rows * classes < 1e8 or torch_device.type == "cuda" else 3
            torch_times[(name, shape)] = time_torch(name, rows, classes, repeats, torch_device)
            print(f"  torch {name} {shape}: {torch_times[(name, shape)] * 1e3:.1f} ms", file=sys.stderr)

    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not args.skip_cargo:
        pattern = "^(bandwidth/|fused/({})/({})/.*/({})$)".format("|".join(devices), "|".join(losses), "|".join(shapes))
        command = ["cargo", "bench", "--bench", "bench_main", "--features", "flex", "--", pattern, "--noplot"]
        print("running:", " ".join(command), file=sys.stderr)
        environment = dict(os.environ)
        if torch_device.type == "cuda":
            environment["BURN_DISTILL_BENCH_GPU"] = "1"  # the large shapes on wgpu
        subprocess.run(command, cwd=ROOT, check=True, env=environment)
    results = criterion_results(target)
    copy = results.get(("bandwidth", "copy/1GiB", None))
    copy_bandwidth = copy[1] / copy[0] if copy else None

    lines = []
    if copy_bandwidth:
        lines.append(f"Copy bandwidth (`bandwidth/copy/1GiB`): {copy_bandwidth / 1e9:.1f} GB/s.\n")
    if gpu_bandwidth:
        lines.append(f"GPU copy bandwidth (torch, 1 GiB on {torch_device}): {gpu_bandwidth / 1e9:.1f} GB/s; the wgpu rows' share is of this.\n")
    eager = "PyTorch CUDA eager" if torch_device.type == "cuda" else "PyTorch eager"
    lines.append(f"| shape | loss | device | fused | composed | {eager} | composed / fused | PyTorch / fused | fused GB/s (12 B/elem) | share of copy bandwidth |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda seconds: "-" if seconds is None else (f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs")
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.1f}×"
    for shape in shapes:
        rows, classes = map(int, shape.split("x"))
        for name in losses:
            for device in devices:
                fused = results.get((f"fused/{device}", f"{name}/fused", shape))
                composed = results.get((f"fused/{device}", f"{name}/composed", shape))
                if fused is None and composed is None:
                    continue
                fused_s = fused[0] if fused else None
                composed_s = composed[0] if composed else None
                torch_s = torch_times.get((name, shape))
                gbps = 12 * rows * classes / fused_s if fused_s else None
                limit = gpu_bandwidth if device in ("wgpu", "cuda") and gpu_bandwidth else copy_bandwidth
                share = f"{100 * gbps / limit:.0f} %" if gbps and limit else "-"
                lines.append(
                    f"| {shape} | {name} | {device} | {fmt(fused_s)} | {fmt(composed_s)} | {fmt(torch_s)} | "
                    f"{ratio(composed_s, fused_s)} | {ratio(torch_s, fused_s)} | "
                    f"{'-' if gbps is None else f'{gbps / 1e9:.1f}'} | {share} |"
                )
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
