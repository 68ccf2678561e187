"""Train a learnable relative-position bias for a few steps; the loss goes down.

    python examples/train_relative_bias.py        (GPU if present, else the Triton interpreter)

The target comes from a hidden bias table; the model learns its own table (and q) by
gradient descent through the generated backward kernels.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attngen  # noqa: E402

attn = attngen.load(str(Path(__file__).with_name("relative_bias.attn")))
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
B, H, S, D = 2, 4, 64 if dev == "cpu" else 1024, 32
q0, k, v = (torch.randn(B, H, S, D, device=dev) for _ in range(3))
hidden = torch.randn(H, 65, device=dev)
with torch.no_grad():
    target = attn(q0, k, v, hidden)

q = q0.clone().requires_grad_()
bias = torch.zeros(H, 65, device=dev, requires_grad=True)
opt = torch.optim.Adam([q, bias], lr=0.05)
losses = []
for step in range(20):
    loss = (attn(q, k, v, bias) - target).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.5f}")
assert losses[-1] < 0.5 * losses[0], losses
