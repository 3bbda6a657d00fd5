"""Heads that sit on an encoder's pooled embedding during pre-training and are dropped afterwards.

- :class:`ProjectionHead`: the MLP projector of SimCLR (Chen et al., arXiv 2002.05709, 2 layers) and
  Barlow Twins (Zbontar et al., arXiv 2103.03230, 3 layers): Linear -> BatchNorm -> ReLU, repeated, then a
  final Linear. BatchNorm statistics are per data-parallel rank (no SyncBatchNorm), kept in float32
  under DeepSpeed's bf16 mode (:class:`BatchNorm1d`).
- :class:`MultiHeadProjector`: C independent projection heads of the same shape (AMCL, arXiv 2310.05615).
- :class:`PairTemperature`: AMCL's shared temperature network: τ(a, b) = τ_min + (τ_max − τ_min) ·
  sigmoid(−⟨φ(a), φ(b)⟩) with φ a 2-layer MLP (the form in the authors' released code).
- :class:`LogitScale`: CLIP's learnable logit scale (Radford et al., arXiv 2103.00020): stored as a log,
  initialised at 1/0.07, capped at a maximum (100) when read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed in the dtype of its running statistics.

    DeepSpeed's bf16/fp16 mode casts parameters but keeps buffers in float32, and the stock module then
    fails on mixed dtypes; here input, weight and bias follow the buffers (float32 under DeepSpeed, so the
    batch statistics are also accumulated in float32), and the output returns to the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        w = self.weight.to(dtype) if self.weight is not None else None
        b = self.bias.to(dtype) if self.bias is not None else None
        use_batch_stats = self.training or self.running_mean is None
        y = F.batch_norm(
            x.to(dtype), self.running_mean, self.running_var, w, b, use_batch_stats, self.momentum, self.eps
        )
        return y.to(x.dtype)


class ProjectionHead(nn.Module):
    """(B, in_dim) -> (B, out_dim): ``n_layers − 1`` x [Linear, BatchNorm1d, ReLU], then Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, n_layers: int = 2, batch_norm: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers={n_layers} is not allowed; allowed: >= 1")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(n_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiHeadProjector(nn.Module):
    """C projection heads with independent weights: (B, in_dim) -> (C, B, out_dim)."""

    def __init__(self, n_heads: int, in_dim: int, hidden_dim: int, out_dim: int, *, n_layers: int = 2):
        super().__init__()
        self.heads = nn.ModuleList(
            ProjectionHead(in_dim, hidden_dim, out_dim, n_layers=n_layers) for _ in range(n_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads])  # (C, B, out_dim)


class PairTemperature(nn.Module):
    """φ of AMCL's pair-adaptive temperature, shared by all heads: (..., dim) -> (..., dim).

    ``forward`` returns φ(z); :meth:`pair_tau` turns two sets of φ outputs into the temperature matrix.
    High ⟨φ(a), φ(b)⟩ (an easy, confident pair) gives a temperature near ``tau_min``, low a temperature
    near ``tau_max``.
    """

    def __init__(self, dim: int, *, hidden_dim: int | None = None, tau_min: float = 0.05, tau_max: float = 1.0):
        super().__init__()
        if not 0.0 < tau_min < tau_max:
            raise ValueError(f"tau_min={tau_min}, tau_max={tau_max}: allowed 0 < tau_min < tau_max")
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        hidden = hidden_dim or dim
        self.phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.phi(z)

    def pair_tau(self, phi_a: torch.Tensor, phi_b: torch.Tensor) -> torch.Tensor:
        """(..., N, d), (..., M, d) -> temperatures (..., N, M) in (tau_min, tau_max)."""
        return pair_temperature(phi_a, phi_b, tau_min=self.tau_min, tau_max=self.tau_max)


def pair_temperature(phi_a: torch.Tensor, phi_b: torch.Tensor, *, tau_min: float, tau_max: float) -> torch.Tensor:
    """τ = tau_min + (tau_max − tau_min) · sigmoid(−⟨φa, φb⟩), computed in float32: (..., N, M)."""
    score = phi_a.float() @ phi_b.float().transpose(-1, -2)
    return tau_min + (tau_max - tau_min) * torch.sigmoid(-score)


class LogitScale(nn.Module):
    """CLIP's logit scale s = min(exp(θ), max_scale), θ learnable, exp(θ₀) = ``init``.

    The cap is applied when the scale is read (the gradient is zero while capped), which has the effect
    of the paper's clipping of θ at log(100) without modifying parameters in place (safe under ZeRO-3).
    """

    def __init__(self, *, init: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        if not 0 < init <= max_scale:
            raise ValueError(f"logit scale init={init} must be in (0, max_scale={max_scale}]")
        self.max_scale = float(max_scale)
        # shape (1,), not 0-dim: DeepSpeed broadcasts parameters as byte views, impossible for 0-dim tensors
        self.log_scale = nn.Parameter(torch.tensor([math.log(init)]))

    def forward(self) -> torch.Tensor:
        """The scale as a 0-dim float32 tensor."""
        return self.log_scale.float().exp().clamp(max=self.max_scale)[0]
