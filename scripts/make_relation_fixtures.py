#!/usr/bin/env python3
"""Reference values for the feature and relational losses of burn-distill-loss, in float64.

Writes tests/fixtures/relations.json: for every loss, inputs (float32 values, so Rust reads the
very same numbers), the loss and its gradient with respect to the student's input (and, for
CRD, the embeddings' weights, the updated memory banks and normalisers, and a second step).

    pip install torch
    python3 scripts/make_relation_fixtures.py

Each formula is the authors' reference code written out (RepDistiller for AT, RKD, PKT, SP and
CRD; the DIST authors' repository; Nguyen et al.'s minibatch CKA; Kornblith et al.'s linear
CKA), with these differences, which the Rust docs state:
- AT uses |A|^p (the paper); the code's A.pow(p) differs only for odd p and negative inputs.
- Norms are max(||v||, 1e-12) everywhere (F.normalize's floor), where the code divides by ||v||.
"""
import json
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(20261207)
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "relations.json"


def f32(t):
    """Round to float32 and back, so fixtures hold exactly what Rust reads."""
    return t.float().double()


def tensor(shape, scale=1.0):
    return f32(torch.randn(*shape, dtype=torch.float64) * scale)


def dump(t):
    return {"shape": list(t.shape), "values": t.detach().reshape(-1).tolist()}


# --- Attention transfer (Zagoruyko & Komodakis; RepDistiller Attention) ----------------------
def at_map(x, p):
    return F.normalize(x.abs().pow(p).mean(1).view(x.size(0), -1))


def at_loss(s, t, p):
    return (at_map(s, p) - at_map(t, p)).pow(2).mean()


# --- RKD (Park et al.; RepDistiller RKDLoss) ---------------------------------------------------
def pdist(e, eps=1e-12):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    res = res.sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_terms(s, t):
    t_d = pdist(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(s)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    td = t.unsqueeze(0) - t.unsqueeze(1)
    norm_td = F.normalize(td, p=2, dim=2)
    t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = s.unsqueeze(0) - s.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return loss_d, loss_a


# --- PKT (Passalis & Tefas; RepDistiller PKT.cosine_similarity_loss) -------------------------
def pkt_loss(s, t, eps=1e-7):
    def conditional(x):
        norm = torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)).clamp(min=1e-12)
        x = x / (norm + eps)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        sim = (x @ x.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    ms, ts = conditional(s), conditional(t)
    return torch.mean(ts * torch.log((ts + eps) / (ms + eps)))


# --- SP (Tung & Mori; RepDistiller Similarity) -------------------------------------------------
def sp_loss(s, t):
    bsz = s.shape[0]
    s = s.view(bsz, -1)
    t = t.view(bsz, -1)
    g_s = F.normalize(s @ s.t())
    g_t = F.normalize(t @ t.t())
    diff = g_t - g_s
    return (diff * diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


# --- DIST (Huang et al.; the authors' dist_kd.py) ----------------------------------------------
def cosine_similarity(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def pearson_correlation(a, b, eps=1e-8):
    return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def inter_class_relation(y_s, y_t):
    return 1 - pearson_correlation(y_s, y_t).mean()


def intra_class_relation(y_s, y_t):
    return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


def dist_terms(z_s, z_t, tau):
    y_s = (z_s / tau).softmax(dim=1)
    y_t = (z_t / tau).softmax(dim=1)
    return inter_class_relation(y_s, y_t), intra_class_relation(y_s, y_t)


# --- Linear CKA ---------------------------------------------------------------------------------
def cka_biased(x, y):
    """Kornblith et al.'s feature_space_linear_cka."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    dot = (y.t() @ x).norm() ** 2
    return dot / ((x.t() @ x).norm() * (y.t() @ y).norm())


def unbiased_hsic(k, l):
    """Nguyen et al. (2021), minibatch CKA: the unbiased HSIC of Song et al. (2012)."""
    n = k.shape[0]
    k = k.clone()
    l = l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype)
    trace = torch.trace(k @ l)
    nominator1 = (ones.t() @ k @ ones) * (ones.t() @ l @ ones)
    nominator2 = ones.t() @ k @ l @ ones
    middle = nominator1 / ((n - 1) * (n - 2)) - 2 * nominator2 / (n - 2)
    return ((trace + middle) / (n * (n - 3)))[0, 0]


def hsic_triple(x, y):
    k = x @ x.t()
    l = y @ y.t()
    return unbiased_hsic(k, l), unbiased_hsic(k, k), unbiased_hsic(l, l)


def cka_debiased(x, y):
    xy, xx, yy = hsic_triple(x, y)
    return xy / torch.sqrt(xx * yy)


# --- Hidden states --------------------------------------------------------------------------
def hidden_loss(s, t, mask, distance):
    if distance == "Mse":
        per = (s - t).pow(2).mean(-1)
    else:
        per = 1 - F.cosine_similarity(s, t, dim=-1)
    m = mask.double()
    return (per * m).sum() / m.sum()


# --- CRD (Tian et al.; RepDistiller CRDLoss, ContrastMemory, ContrastLoss) -------------------
def crd_step(fs, ft, ws, bs, wt, bt, mem_s, mem_t, z, idx, neg, T, momentum, n_data):
    """One CRD step; returns (loss, s_loss, t_loss, new banks, z)."""
    def embed(x, w, b):
        x = x @ w.t() + b
        norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
        return x.div(norm)

    v1 = embed(fs, ws, bs)
    v2 = embed(ft, wt, bt)
    bsz = v1.shape[0]
    d = v1.shape[1]
    K = neg.shape[1]
    full = torch.cat([idx.view(-1, 1), neg], 1)
    weight_v1 = mem_s[full.view(-1)].view(bsz, K + 1, d)
    out_v2 = torch.exp(torch.bmm(weight_v1, v2.view(bsz, d, 1)) / T)
    weight_v2 = mem_t[full.view(-1)].view(bsz, K + 1, d)
    out_v1 = torch.exp(torch.bmm(weight_v2, v1.view(bsz, d, 1)) / T)
    z = list(z)
    if z[0] < 0:
        z[0] = (out_v1.mean() * n_data).item()
    if z[1] < 0:
        z[1] = (out_v2.mean() * n_data).item()
    out_v1 = out_v1 / z[0]
    out_v2 = out_v2 / z[1]

    def contrast_loss(x, eps=1e-7):
        m = x.size(1) - 1
        pn = 1.0 / n_data
        p_pos = x.select(1, 0)
        log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz

    s_loss = contrast_loss(out_v1)[0]
    t_loss = contrast_loss(out_v2)[0]
    with torch.no_grad():
        new_s = mem_s.clone()
        new_t = mem_t.clone()
        l_pos = mem_s[idx] * momentum + v1.detach() * (1 - momentum)
        new_s[idx] = l_pos / l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
        ab_pos = mem_t[idx] * momentum + v2.detach() * (1 - momentum)
        new_t[idx] = ab_pos / ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
    return s_loss + t_loss, s_loss, t_loss, new_s, new_t, z


def grad_case(name, fn, student, teacher, **extra):
    s = student.clone().requires_grad_(True)
    value = fn(s, teacher)
    value.backward()
    case = {"loss": name, "student": dump(student), "teacher": dump(teacher), "value": value.item(),
            "grad": s.grad.reshape(-1).tolist()}
    case.update(extra)
    return case


def main():
    cases = []
    # AT: signed maps, different channel counts, p = 2 and p = 3.
    s = tensor([3, 4, 5, 6])
    t = tensor([3, 7, 5, 6])
    for p in (2.0, 3.0):
        cases.append(grad_case("at", lambda a, b, p=p: at_loss(a, b, p), s, t, p=p))
    # RKD: widths 5 and 9, batch 6; the terms and the default-weighted sum.
    s = tensor([6, 5])
    t = tensor([6, 9], 2.0)
    cases.append(grad_case("rkd_distance", lambda a, b: rkd_terms(a, b)[0], s, t))
    cases.append(grad_case("rkd_angle", lambda a, b: rkd_terms(a, b)[1], s, t))
    cases.append(grad_case("rkd", lambda a, b: 25 * rkd_terms(a, b)[0] + 50 * rkd_terms(a, b)[1], s, t))
    # PKT, SP (rank 4 flattened).
    cases.append(grad_case("pkt", pkt_loss, s, t))
    cases.append(grad_case("sp", sp_loss, tensor([5, 3, 2, 2]), tensor([5, 4, 2, 2])))
    # DIST at tau 1 (beta = gamma = 1) and tau 4 (beta = gamma = 2).
    zs = tensor([6, 7], 2.0)
    zt = tensor([6, 7], 3.0)
    for beta, gamma, tau in ((1.0, 1.0, 1.0), (2.0, 2.0, 4.0)):
        def dist(a, b, beta=beta, gamma=gamma, tau=tau):
            inter, intra = dist_terms(a, b, tau)
            return tau ** 2 * (beta * inter + gamma * intra)
        cases.append(grad_case("dist", dist, zs, zt, beta=beta, gamma=gamma, temperature=tau))
    # CKA: batch narrower than the features (Gram form) and wider (cross-product form);
    # features with a large common offset (the estimators are translation invariant).
    for shape_s, shape_t, offset in (([8, 5], [8, 11], 0.0), ([12, 3], [12, 4], 0.0), ([8, 5], [8, 11], 30.0)):
        s = tensor(shape_s)
        # The teacher shares the student's first directions, so CKA is far from 0 and 1.
        shared = torch.cat([s, torch.zeros(shape_s[0], shape_t[1] - shape_s[1], dtype=torch.float64)], 1)
        t = f32(tensor(shape_t) * 0.7 + shared)
        s = f32(s + offset)
        cases.append(grad_case("cka", lambda a, b: 1 - cka_debiased(a, b), s, t, debiased=True))
        cases.append(grad_case("cka", lambda a, b: 1 - cka_biased(a, b), s, t, debiased=False))
    # Minibatch CKA: three batches of 6, HSICs summed (Nguyen et al.).
    batches = [(tensor([6, 5]), tensor([6, 9])) for _ in range(3)]
    sums = [sum(hsic_triple(x, y)[i] for x, y in batches) for i in range(3)]
    cases.append({"loss": "minibatch_cka", "batches": [[dump(x), dump(y)] for x, y in batches],
                  "value": (sums[0] / torch.sqrt(sums[1] * sums[2])).item()})
    # Hidden states, masked.
    s = tensor([2, 4, 6])
    t = tensor([2, 4, 6])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for distance in ("Mse", "Cosine"):
        cases.append(grad_case("hidden", lambda a, b, d=distance: hidden_loss(a, b, mask, d), s, t,
                               distance=distance, mask=mask.reshape(-1).tolist()))
    # CRD: 20 examples, embeddings of 6, 5 negatives, batch 4; two steps.
    n_data, d, K, T, momentum = 20, 6, 5, 0.07, 0.5
    ws, bs = tensor([d, 7], 0.4), tensor([d], 0.1)
    wt, bt = tensor([d, 9], 0.3), tensor([d], 0.1)
    stdv = 1.0 / (d / 3) ** 0.5
    mem_s = f32(torch.rand(n_data, d, dtype=torch.float64) * 2 * stdv - stdv)
    mem_t = f32(torch.rand(n_data, d, dtype=torch.float64) * 2 * stdv - stdv)
    initial_banks = [dump(mem_s), dump(mem_t)]
    steps = []
    z = (-1.0, -1.0)
    for step in range(2):
        fs, ft = tensor([4, 7]), tensor([4, 9])
        idx = torch.randperm(n_data)[:4]
        neg = torch.stack([torch.tensor([j for j in torch.randperm(n_data).tolist() if j != i][:K]) for i in idx.tolist()])
        fs_ = fs.clone().requires_grad_(True)
        ws_ = ws.clone().requires_grad_(True)
        wt_ = wt.clone().requires_grad_(True)
        loss, s_loss, t_loss, new_s, new_t, z = crd_step(fs_, ft, ws_, bs, wt_, bt, mem_s, mem_t, z, idx, neg, T,
                                                         momentum, n_data)
        loss.backward()
        steps.append({"student": dump(fs), "teacher": dump(ft), "indices": idx.tolist(),
                      "negatives": neg.reshape(-1).tolist(), "loss": loss.item(), "student_term": s_loss.item(),
                      "teacher_term": t_loss.item(), "grad_student": fs_.grad.reshape(-1).tolist(),
                      "grad_student_embed": ws_.grad.reshape(-1).tolist(),
                      "grad_teacher_embed": wt_.grad.reshape(-1).tolist(),
                      "student_bank": new_s.reshape(-1).tolist(), "teacher_bank": new_t.reshape(-1).tolist(),
                      "normalisers": list(z)})
        mem_s, mem_t = new_s, new_t  # the optimizer does not move the embeddings here
    cases.append({"loss": "crd", "examples": n_data, "embedding_width": d, "negatives": K, "temperature": T,
                  "momentum": momentum, "student_embed": dump(ws), "student_bias": dump(bs),
                  "teacher_embed": dump(wt), "teacher_bias": dump(bt),
                  "initial_banks": initial_banks, "steps": steps})
    # Hidden states with tiny norms at some positions: PyTorch's cosine divides by
    # max(|a|, eps) * max(|b|, eps), not max(|a| |b|, eps). Value only: below eps PyTorch clamps
    # the squared norms in place under no_grad, so its gradient still goes through the norm it
    # no longer divides by; burn-distill's is the gradient of the function as written (the
    # clamped norm is a constant there). The two agree wherever a norm is above eps.
    s = tensor([2, 3, 4])
    t = tensor([2, 3, 4])
    s[0, 1] *= 1e-9
    t[0, 1] *= 1e-9
    s[1, 2] *= 1e-6
    s, t = f32(s), f32(t)
    mask = torch.ones(2, 3, dtype=torch.long)
    cases.append(grad_case("hidden", lambda a, b: hidden_loss(a, b, mask, "Cosine"), s, t,
                           distance="Cosine", mask=mask.reshape(-1).tolist(), value_only=True))
    payload = {"generator": "scripts/make_relation_fixtures.py", "torch": torch.__version__, "cases": cases}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(OUT)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
