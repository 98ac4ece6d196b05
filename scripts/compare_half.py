#!/usr/bin/env python3
"""The fused host kernel at f32, bf16 and f16 inputs against PyTorch eager and torch.compile,
in one run (issue 25), with the kernel's two ceilings.

For each shape, loss and precision it times, interleaved round by round (this VM's speed drifts
by up to 2x between minutes, so every contender gets the same minutes):

- ours, `fused_profile` (examples/fused_profile.rs) on flex:
  - "shared": the student logits are a leaf also held by the caller, so the kernel writes the
    gradient into a new buffer (what the criterion bench `fused/...` measures);
  - "fresh": new logits each call, held by nothing else (a model's output): the kernel writes
    the gradient over them;
  - "baseline": `--baseline BINARY`, an older `fused_profile` (its only mode is "shared", f32);
- PyTorch eager and `torch.compile` (inductor, CPU) on the same formulas, the half-precision
  inputs upcast to f32 inside the loss (the gradient comes back in the input's precision), on
  as many threads as this machine has cores.

Every figure is the median of `--rounds` rounds; a round of ours is `--calls` calls of one
process (the mean), a round of PyTorch the median of `--calls` calls after warm-up. The bounds
come from `fused_profile --bounds` (`kernel_bounds`: the exponentials alone, and 12 bytes per
element of memory traffic alone, each on every core).

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    cargo build --release --features flex --example fused_profile
    /tmp/torchenv/bin/python scripts/compare_half.py --shapes 2048x32000 --baseline /tmp/fused_profile_base

PyTorch is used only here, never by the crates.
"""

import argparse
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "target" / "release" / "examples" / "fused_profile"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def logits(rows, classes, seed):
    """fused_profile's logits: uniform in [-4, 4) from a hash of the index."""
    mask = 0xFFFFFFFF
    i = torch.arange(rows * classes, dtype=torch.int64)
    x = ((i + seed * 1_000_003) & mask) * 2_654_435_761 & mask
    return ((x >> 8).to(torch.float32) / float(1 << 24) * 8.0 - 4.0).reshape(rows, classes)


def loss_fn(name, student, teacher, labels):
    """fused_profile's settings: forward KL at T = 2; Hinton KD alpha 0.5, T 4, T^2 on."""
    student, teacher = student.float(), teacher.float()
    if name == "hinton":
        t = 4.0
        soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                        reduction="batchmean", log_target=True) * t * t
        return 0.5 * F.cross_entropy(student, labels) + 0.5 * soft
    t = 2.0
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    reduction="batchmean", log_target=True)


def torch_round(fn, student_data, teacher, labels, calls):
    times = []
    for _ in range(calls + 1):  # the first is a warm-up
        student = student_data.clone().requires_grad_(True)
        start = time.perf_counter()
        fn(student, teacher, labels).backward()
        _ = student.grad[0, 0].item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def ours(binary, loss, calls, rows, classes, dtype=None, fresh=False):
    args = [str(binary), loss, str(calls)]
    if (rows, classes) != (2048, 32000):  # the baseline binary knows only its fixed shape
        args += ["--rows", str(rows), "--classes", str(classes)]
    if dtype:
        args += ["--dtype", dtype]
    if fresh:
        args.append("--fresh")
    env = dict(os.environ)
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    match = re.search(r"([0-9.]+) ms per call", out)
    if not match or f"{rows} x {classes}" not in out:
        raise RuntimeError(f"unexpected output from {args}: {out}")
    return float(match.group(1)) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x32000")
    parser.add_argument("--losses", default="forward_kl,hinton")
    parser.add_argument("--dtypes", default="f32,bf16,f16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--baseline", type=Path, help="an older fused_profile binary (f32, shared)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    lines = [f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads; {os.cpu_count()} cores"]
    header = "| shape | loss | inputs | ours, fresh logits | ours, shared logits | baseline (f32, shared) | PyTorch eager | torch.compile | eager / fresh | compile / fresh |"
    table = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        rows, classes = map(int, shape.split("x"))
        bounds = subprocess.run([str(PROFILE), "forward_kl", "1", "--bounds", "--rows", str(rows), "--classes",
                                 str(classes)], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        lines.append(bounds)
        print(bounds, flush=True)
        baseline = args.baseline if (rows, classes) == (2048, 32000) else None
        teacher32 = logits(rows, classes, 2)
        student32 = logits(rows, classes, 1)
        labels = (torch.arange(rows) * 7919) % classes
        for loss in args.losses.split(","):
            compiled = None if args.no_compile else torch.compile(lambda s, t, l, loss=loss: loss_fn(loss, s, t, l))
            for dtype in args.dtypes.split(","):
                student, teacher = student32.to(DTYPES[dtype]), teacher32.to(DTYPES[dtype])
                eager = lambda s, t, l, loss=loss: loss_fn(loss, s, t, l)
                results = {key: [] for key in ["fresh", "shared", "baseline", "eager", "compile"]}
                for _ in range(args.rounds):
                    results["fresh"].append(ours(PROFILE, loss, args.calls, rows, classes, dtype, fresh=True))
                    results["shared"].append(ours(PROFILE, loss, args.calls, rows, classes, dtype))
                    if baseline and dtype == "f32":
                        results["baseline"].append(ours(baseline, loss, args.calls, rows, classes))
                    results["eager"].append(torch_round(eager, student, teacher, labels, args.calls))
                    if compiled is not None:
                        results["compile"].append(torch_round(compiled, student, teacher, labels, args.calls))
                med = {key: statistics.median(values) if values else None for key, values in results.items()}
                ms = lambda v: f"{v * 1e3:.1f} ms" if v else "-"
                ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
                row = f"| {shape} | {loss} | {dtype} | {ms(med['fresh'])} | {ms(med['shared'])} | {ms(med['baseline'])} | {ms(med['eager'])} | {ms(med['compile'])} | {ratio(med['eager'], med['fresh'])} | {ratio(med['compile'], med['fresh'])} |"
                print(row, flush=True)
                table.append(row)
    text = "\n".join(lines + [""] + table) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
