#!/usr/bin/env python3
"""PyTorch eager timings of the feature and relational losses, forward + backward, at the
shapes of benches/benchmarks/relations.rs, for the ratio in BENCHMARKS.md.

    pip install torch
    python3 scripts/compare_relations.py [--threads 2] [--repeats 20] [--compile]

Each loss is the authors' formula as scripts/make_relation_fixtures.py writes it out (the
values those fixtures check), run in float32 on the CPU; the median of `--repeats` timed calls
after 3 warm-ups is printed in milliseconds, one line per loss, with the bench id it pairs with;
with `--compile` also under `torch.compile` (its first calls, the compilation, are among the
warm-ups).
"""
import argparse
import statistics
import time

import torch

import make_relation_fixtures as ref


def timed(fn, repeats):
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def values(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true",
                        help="also time each loss under torch.compile (inductor, C++ on the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def case(student, teacher, loss):
        def run():
            s = student.clone().requires_grad_(True)
            loss(s, teacher).backward()
            return s.grad
        return run

    s512, t512 = values([128, 512], 1), values([128, 512], 2)
    mask = (values([8, 256], 3) > -0.8).float()

    def hidden(distance):
        def loss(s, t):
            if distance == "mse":
                per = (s - t).pow(2).mean(-1)
            else:
                per = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
            return (per * mask).sum() / mask.sum()
        return loss

    # CRD as RepDistiller runs it: embeddings, memory lookups, NCE, the momentum update.
    n_data, k, d = 50_000, 4096, 128
    ws = torch.nn.Linear(512, d)
    wt = torch.nn.Linear(512, d)
    stdv = 1.0 / (d / 3) ** 0.5
    mem_s = torch.rand(n_data, d) * 2 * stdv - stdv
    mem_t = torch.rand(n_data, d) * 2 * stdv - stdv
    idx = torch.arange(128) * 37
    neg = torch.randint(0, n_data, (128, k))

    def crd(s, t):
        def embed(x, linear):
            x = linear(x)
            return x / x.pow(2).sum(1, keepdim=True).pow(0.5)

        v1, v2 = embed(s, ws), embed(t, wt)
        full = torch.cat([idx.view(-1, 1), neg], 1).view(-1)
        out_v2 = torch.exp(torch.bmm(mem_s[full].view(128, k + 1, d), v2.view(128, d, 1)) / 0.07) / n_data
        out_v1 = torch.exp(torch.bmm(mem_t[full].view(128, k + 1, d), v1.view(128, d, 1)) / 0.07) / n_data

        def nce(x, eps=1e-7):
            m, pn = x.size(1) - 1, 1.0 / n_data
            p_pos = x.select(1, 0)
            log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log()
            p_neg = x.narrow(1, 1, m)
            log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log()
            return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / 128

        with torch.no_grad():  # ContrastMemory's in-place momentum update
            for memory, v in ((mem_s, v1), (mem_t, v2)):
                pos = memory.index_select(0, idx) * 0.5 + v.detach() * 0.5
                memory.index_copy_(0, idx, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
        return (nce(out_v1) + nce(out_v2)).sum()

    cases = [
        ("at_128x256x8x8", values([128, 256, 8, 8], 1), values([128, 256, 8, 8], 2),
         lambda s, t: ref.at_loss(s, t, 2.0)),
        ("rkd_128x512", s512, t512, lambda s, t: (lambda d, a: 25 * d + 50 * a)(*ref.rkd_terms(s, t))),
        ("pkt_128x512", s512, t512, ref.pkt_loss),
        ("sp_128x512", s512, t512, ref.sp_loss),
        ("cka_128x512", s512, t512, lambda s, t: 1 - ref.cka_debiased(s, t)),
        ("dist_128x1000", values([128, 1000], 1) * 4, values([128, 1000], 2) * 4,
         lambda s, t: sum(ref.dist_terms(s, t, 1.0))),
        ("hidden_mse_8x256x576", values([8, 256, 576], 1), values([8, 256, 576], 2), hidden("mse")),
        ("hidden_cosine_8x256x576", values([8, 256, 576], 1), values([8, 256, 576], 2), hidden("cosine")),
        ("crd_128x512_k4096", s512, t512, crd),
    ]
    print(f"torch {torch.__version__}, {args.threads} threads, float32, median of {args.repeats}")
    print("bench id\teager" + ("\ttorch.compile" if args.compile else ""))
    for name, student, teacher, loss in cases:
        line = f"relation/flex/{name}\t{timed(case(student.float(), teacher.float(), loss), args.repeats):.3f} ms"
        if args.compile:
            # CRD updates its memory banks in place under no_grad: compiled as it stands, the
            # graph breaks there, as it would in RepDistiller's training loop.
            compiled = torch.compile(loss, dynamic=False)
            line += f"\t{timed(case(student.float(), teacher.float(), compiled), args.repeats):.3f} ms"
        print(line, flush=True)


if __name__ == "__main__":
    main()
