"""Compiles small functions with torch.compile (inductor's C++ code on the CPU) through the caches
its environment names, and checks each against eager: `python compile_tiny.py f g`."""

import sys

import torch


def f(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


def g(x: torch.Tensor) -> torch.Tensor:
    return torch.cos(x) @ x.T


x = torch.randn(8, 8)
for name in sys.argv[1:]:
    fn = {"f": f, "g": g}[name]
    assert torch.allclose(torch.compile(fn)(x), fn(x), atol=1e-5), name
    print(f"{name}: compiled", flush=True)
