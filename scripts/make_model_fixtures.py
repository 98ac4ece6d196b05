#!/usr/bin/env python3
"""PyTorch teachers for the weight-import tests of burn-distill-model.

Writes, under tests/fixtures/models/:
- mlp.safetensors: a 12-16-8-5 MLP whose module names match burn-distill's Mlp
  (hidden = ModuleList of Linear, output = Linear), so keys need no remapping;
- mlp_sequential.safetensors: the same weights as nn.Sequential (keys 0., 2., 4.), to test
  key remapping;
- mlp.json: an input batch and the PyTorch outputs (float32 forward, ReLU between layers);
- lm.safetensors, lm.json: a small decoder-only transformer LM whose module names match
  burn-distill's TransformerLm (burn's TransformerEncoder in pre-norm mode, where `norm_2`
  comes before attention and `norm_1` before the feed-forward), with token ids and logits.

    pip install torch safetensors
    python3 scripts/make_model_fixtures.py
"""
import json
import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
torch.manual_seed(3)


class Mlp(torch.nn.Module):
    def __init__(self, widths, classes):
        super().__init__()
        self.hidden = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = torch.nn.Linear(widths[-1], classes)

    def forward(self, x):
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.output(x)


class Attention(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.query = torch.nn.Linear(width, width)
        self.key = torch.nn.Linear(width, width)
        self.value = torch.nn.Linear(width, width)
        self.output = torch.nn.Linear(width, width)

    def forward(self, x):
        b, s, w = x.shape
        split = lambda t: t.view(b, s, self.heads, w // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        weights = torch.softmax(scores.masked_fill(causal, float("-inf")), -1)
        return self.output((weights @ v).transpose(1, 2).reshape(b, s, w))


class FeedForward(torch.nn.Module):
    def __init__(self, width, inner):
        super().__init__()
        self.linear_inner = torch.nn.Linear(width, inner)
        self.linear_outer = torch.nn.Linear(inner, width)

    def forward(self, x):
        return self.linear_outer(torch.nn.functional.gelu(self.linear_inner(x)))


class Block(torch.nn.Module):
    def __init__(self, width, heads, inner):
        super().__init__()
        self.mha = Attention(width, heads)
        self.norm_1 = torch.nn.LayerNorm(width)
        self.norm_2 = torch.nn.LayerNorm(width)
        self.pwff = FeedForward(width, inner)

    def forward(self, x):
        x = x + self.mha(self.norm_2(x))
        return x + self.pwff(self.norm_1(x))


class Blocks(torch.nn.Module):
    def __init__(self, layers, width, heads, inner):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(width, heads, inner) for _ in range(layers))


class TransformerLm(torch.nn.Module):
    def __init__(self, vocab, context, layers, heads, width, ratio):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.position_embedding = torch.nn.Embedding(context, width)
        self.blocks = Blocks(layers, width, heads, width * ratio)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1])
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks.layers:
            x = block(x)
        return self.norm(x) @ self.token_embedding.weight.T


def write_lm():
    config = dict(vocab=30, context=12, layers=2, heads=2, width=16, ratio=4)
    model = TransformerLm(**config).eval()
    with torch.no_grad():  # non-trivial norms, so a gamma/beta mix-up shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, OUT / "lm.safetensors")
    tokens = torch.randint(0, config["vocab"], (2, 9))
    with torch.no_grad():
        logits = model(tokens)
    (OUT / "lm.json").write_text(json.dumps({
        "generator": "scripts/make_model_fixtures.py",
        "torch": torch.__version__,
        "config": config,
        "tokens": tokens.flatten().tolist(),
        "tokens_shape": list(tokens.shape),
        "logits": logits.flatten().tolist(),
    }))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    model = Mlp([12, 16, 8], 5).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, OUT / "mlp.safetensors")
    sequential = torch.nn.Sequential(model.hidden[0], torch.nn.ReLU(), model.hidden[1],
                                     torch.nn.ReLU(), model.output)
    save_file({k: v.contiguous() for k, v in sequential.state_dict().items()},
              OUT / "mlp_sequential.safetensors")
    x = torch.rand(4, 12)
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(y, sequential(x))
    (OUT / "mlp.json").write_text(json.dumps({
        "generator": "scripts/make_model_fixtures.py",
        "torch": torch.__version__,
        "widths": [12, 16, 8],
        "classes": 5,
        "input": x.flatten().tolist(),
        "input_shape": list(x.shape),
        "output": y.flatten().tolist(),
    }))
    write_lm()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
