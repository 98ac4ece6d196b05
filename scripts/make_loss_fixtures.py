#!/usr/bin/env python3
"""Reference values for burn-distill-loss, computed by PyTorch in float64.

Writes tests/fixtures/losses.json: for every loss x temperature x rank, the inputs (float32
values, so Rust sees the very same numbers), the per-position losses, and for each reduction
the reduced value and its gradient with respect to the student logits.

    pip install torch
    python3 scripts/make_loss_fixtures.py

The conventions implemented here are the ones documented in the loss crate; where PyTorch has
the loss (cross-entropy with label smoothing and ignore_index, kl_div) it is used directly.
"""
import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(20261128)
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "losses.json"
IGNORE = -100
CLASSES = 7


def f32(t):
    """Round to float32 and back, so fixtures hold exactly what Rust reads."""
    return t.float().double()


def kl(lp_a, lp_b):
    """KL(a || b) per row with 0 log 0 = 0."""
    a = lp_a.exp()
    return torch.where(a > 0, a * (lp_a - lp_b), torch.zeros_like(a)).sum(-1)


def mixture_kl(lp_a, lp_b, w):
    """KL(a || (1 - w) a + w b)."""
    m = torch.logaddexp(lp_a + math.log(1 - w), lp_b + math.log(w)) if w < 1 else lp_b
    return kl(lp_a, m)


def divergence_rows(div, s, t, T):
    lq = F.log_softmax(s / T, -1)
    lp = F.log_softmax(t / T, -1)
    if div == "ForwardKl":
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    if div == "ReverseKl":
        return F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    if div == "SymmetricKl":
        return kl(lp, lq) + kl(lq, lp)
    if div == "TotalVariation":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if div == "SoftCrossEntropy":
        return -(lp.exp() * lq).sum(-1)
    (name, params), = div.items()
    if name == "GeneralizedJsd":
        b = params["beta"]
        if b == 0:
            return kl(lp, lq)
        if b == 1:
            return kl(lq, lp)
        m = torch.logaddexp(lp + math.log(b), lq + math.log(1 - b))
        return (b * kl(lp, m) + (1 - b) * kl(lq, m)) / (b * (1 - b))
    if name == "SkewKl":
        a = params["alpha"]
        return mixture_kl(lp, lq, 1 - a) if a < 1 else torch.zeros_like(lp[..., 0])
    if name == "SkewReverseKl":
        a = params["alpha"]
        return mixture_kl(lq, lp, 1 - a) if a < 1 else torch.zeros_like(lq[..., 0])
    raise ValueError(div)


def hinton_rows(spec, s, t, labels):
    T = spec["temperature"]
    V = s.shape[-1]
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), reduction="none",
                         label_smoothing=spec["label_smoothing"], ignore_index=IGNORE)
    ce = ce.reshape(labels.shape)
    soft = kl(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1))
    if spec["t2"]:
        soft = soft * T * T
    return spec["alpha"] * ce + (1 - spec["alpha"]) * soft


def dkd_rows(spec, s, t, labels):
    """The DKD reference code (mdistiller), per row, with ignored labels zeroed."""
    T = spec["temperature"]
    safe = labels.clamp_min(0)
    gt = F.one_hot(safe, s.shape[-1]).double()
    other = 1 - gt

    def cat_mask(p):
        return torch.stack([(p * gt).sum(-1), (p * other).sum(-1)], -1)

    ps = cat_mask(F.softmax(s / T, -1))
    pt = cat_mask(F.softmax(t / T, -1))
    tckd = F.kl_div(ps.log(), pt, reduction="none").sum(-1)
    pt2 = F.softmax(t / T - 1000.0 * gt, -1)
    ls2 = F.log_softmax(s / T - 1000.0 * gt, -1)
    nckd = F.kl_div(ls2, pt2, reduction="none").sum(-1)
    rows = spec["alpha"] * tckd + spec["beta"] * nckd
    if spec["t2"]:
        rows = rows * T * T
    return torch.where(labels == IGNORE, torch.zeros_like(rows), rows)


def sparse_teacher(t, k):
    lp_full = F.log_softmax(t, -1)
    values, indices = lp_full.topk(k, -1)
    return f32(values), indices


def sparse_rows(spec, s, values, indices):
    T = spec["temperature"]
    V = s.shape[-1]
    k = values.shape[-1]
    lq = F.log_softmax(s / T, -1)
    if spec["tail"] == "Renormalize" or k == V:
        dense = torch.zeros_like(s)
        dense.scatter_(-1, indices, F.softmax(values / T, -1))
    else:
        tail = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(0) / (V - k)
        w_top = (values / T).exp()
        w_tail = tail ** (1 / T)
        z = w_top.sum(-1, keepdim=True) + (V - k) * w_tail
        dense = (w_tail / z).expand_as(s).clone()
        dense.scatter_(-1, indices, w_top / z)
    lp = torch.where(dense > 0, dense.log(), torch.full_like(dense, -math.inf))
    return kl(lp, lq)


def losses():
    divergences = ["ForwardKl", "ReverseKl", "SymmetricKl", "TotalVariation", "SoftCrossEntropy"]
    divergences += [{"GeneralizedJsd": {"beta": b}} for b in [0.0, 1e-5, 0.1, 0.5, 0.9, 1 - 1e-5, 1.0]]
    divergences += [{"SkewKl": {"alpha": 0.0}}, {"SkewKl": {"alpha": 0.1}}, {"SkewReverseKl": {"alpha": 0.1}}]
    out = [{"kind": "divergence", "divergence": d, "t2": False} for d in divergences]
    out.append({"kind": "divergence", "divergence": "ForwardKl", "t2": True})
    out.append({"kind": "hinton", "alpha": 0.5, "label_smoothing": 0.0, "t2": True})
    out.append({"kind": "hinton", "alpha": 0.1, "label_smoothing": 0.1, "t2": False})
    out.append({"kind": "dkd", "alpha": 1.0, "beta": 8.0, "t2": True})
    for tail in ["Renormalize", "UniformTail"]:
        for k in [3, CLASSES]:
            out.append({"kind": "sparse", "tail": tail, "k": k, "t2": False})
    return out


def make_inputs(rank, scale=3.0, teacher_scale=3.0):
    shape = [4, CLASSES] if rank == 2 else [2, 3, CLASSES]
    s = f32(torch.randn(shape, dtype=torch.float64) * scale)
    t = f32(torch.randn(shape, dtype=torch.float64) * teacher_scale)
    lead = shape[:-1]
    labels = torch.randint(0, CLASSES, lead)
    if rank == 3:
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    else:
        mask = torch.ones(lead, dtype=torch.bool)
    labels = torch.where(mask, labels, torch.full_like(labels, IGNORE))
    return shape, s, t, labels, mask


def per_position(spec, s, t, labels, sparse):
    kind = spec["kind"]
    if kind == "divergence":
        rows = divergence_rows(spec["divergence"], s, t, spec["temperature"])
        if spec["t2"]:
            rows = rows * spec["temperature"] ** 2
        return rows
    if kind == "hinton":
        return hinton_rows(spec, s, t, labels)
    if kind == "dkd":
        return dkd_rows(spec, s, t, labels)
    return sparse_rows(spec, s, *sparse)


def case(spec, rank, s, t, labels, mask, shape):
    V = shape[-1]
    sparse = sparse_teacher(t, spec["k"]) if spec["kind"] == "sparse" else None
    valid = mask.double()
    n_valid = int(mask.sum())
    record = {
        "spec": spec,
        "shape": shape,
        "student": s.flatten().tolist(),
        "teacher": t.flatten().tolist(),
        "labels": labels.flatten().tolist(),
        "mask": mask.flatten().int().tolist(),
        "reductions": [],
    }
    if sparse is not None:
        record["teacher_top_values"] = sparse[0].flatten().tolist()
        record["teacher_top_indices"] = sparse[1].flatten().tolist()
    with torch.no_grad():
        rows = per_position(spec, s, t, labels, sparse)
    if spec["kind"] in ("hinton", "dkd"):
        rows = rows * valid
    record["per_position"] = rows.flatten().tolist()
    for name, count in [("BatchMean", n_valid), ("Sum", 1), ("ElementMean", n_valid * V),
                        ("SumOver", n_valid + 3)]:
        leaf = s.clone().requires_grad_(True)
        rows = per_position(spec, leaf, t, labels, sparse)
        value = (rows * valid).sum() / count
        (grad,) = torch.autograd.grad(value, leaf)
        entry = {"reduction": name, "value": value.item(), "grad": grad.flatten().tolist()}
        if name == "SumOver":
            entry["count"] = count
        record["reductions"].append(entry)
    return record


def main():
    cases = []
    for spec in losses():
        for T in [0.5, 1.0, 4.0, 20.0]:
            for rank in [2, 3]:
                shape, s, t, labels, mask = make_inputs(rank)
                full = dict(spec, temperature=T)
                cases.append(dict(case(full, rank, s, t, labels, mask, shape), group="grid"))
    # Stability: logits of +-1e4, near one-hot teachers, T = 0.05 and 100.
    stability_specs = [
        {"kind": "divergence", "divergence": "ForwardKl", "t2": True},
        {"kind": "divergence", "divergence": "ReverseKl", "t2": False},
        {"kind": "divergence", "divergence": {"GeneralizedJsd": {"beta": 0.5}}, "t2": False},
        {"kind": "divergence", "divergence": {"GeneralizedJsd": {"beta": 1e-4}}, "t2": False},
        {"kind": "divergence", "divergence": "TotalVariation", "t2": False},
        {"kind": "divergence", "divergence": "SoftCrossEntropy", "t2": False},
        {"kind": "hinton", "alpha": 0.5, "label_smoothing": 0.1, "t2": True},
        {"kind": "sparse", "tail": "UniformTail", "k": 3, "t2": False},
    ]
    for spec in stability_specs:
        for T in [0.05, 1.0, 100.0]:
            for scale, teacher_scale, label in [(1e4, 1e4, "logits 1e4"), (2.0, 40.0, "near one-hot teacher")]:
                shape, s, t, labels, mask = make_inputs(3, scale, teacher_scale)
                full = dict(spec, temperature=T)
                cases.append(dict(case(full, 3, s, t, labels, mask, shape), group=f"stability: {label}"))
    # Language-model batches: [3, 6, 40] logits, right-padded to lengths 6, 3 and 1 (the masked
    # positions hold arbitrary logits), every token-level divergence: the mean is over the 10
    # valid tokens.
    lm_specs = [{"kind": "divergence", "divergence": d, "t2": False}
                for d in ["ForwardKl", "ReverseKl", {"GeneralizedJsd": {"beta": 0.5}},
                          {"GeneralizedJsd": {"beta": 0.1}}, {"SkewKl": {"alpha": 0.1}},
                          {"SkewReverseKl": {"alpha": 0.1}}, "TotalVariation"]]
    lm_specs.append({"kind": "hinton", "alpha": 0.5, "label_smoothing": 0.0, "t2": True})
    lm_specs.append({"kind": "sparse", "tail": "UniformTail", "k": 8, "t2": False})
    for spec in lm_specs:
        for T in [1.0, 2.0]:
            shape = [3, 6, 40]
            s = f32(torch.randn(shape, dtype=torch.float64) * 3.0)
            t = f32(torch.randn(shape, dtype=torch.float64) * 3.0)
            lengths = torch.tensor([6, 3, 1])
            mask = torch.arange(6)[None, :] < lengths[:, None]
            labels = torch.randint(0, 40, shape[:-1])
            labels = torch.where(mask, labels, torch.full_like(labels, IGNORE))
            full = dict(spec, temperature=T)
            cases.append(dict(case(full, 3, s, t, labels, mask, shape), group="lm: right-padded batch"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = {"generator": "scripts/make_loss_fixtures.py", "torch": torch.__version__,
               "ignore_index": IGNORE, "cases": cases}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(OUT)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
