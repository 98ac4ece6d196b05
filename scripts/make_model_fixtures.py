#!/usr/bin/env python3
"""PyTorch teachers for the weight-import tests of burn-distill-model.

Writes, under tests/fixtures/models/:
- mlp.safetensors: a 12-16-8-5 MLP whose module names match burn-distill's Mlp
  (hidden = ModuleList of Linear, output = Linear), so keys need no remapping;
- mlp_sequential.safetensors: the same weights as nn.Sequential (keys 0., 2., 4.), to test
  key remapping;
- mlp.json: an input batch and the PyTorch outputs (float32 forward, ReLU between layers).

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
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
