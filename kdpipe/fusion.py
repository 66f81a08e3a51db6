"""Logit fusion of several teachers ("On Giant's Shoulders: ... Dynamic Logits Fusion"): the maths,
as tensor functions, used at train time by the ``fusion_kd`` and ``token_fusion_kl`` losses and
by the teacher-side fusion stage (`kdpipe.fuse_stage`) that writes an extra ``fused`` cache.

Fusion is logit arithmetic: ``z = Σ_i w_i · z_i`` (the paper's ``z_base + Σ_i w_i (z_i - z_base)``
with the base folded into the members: with weights on the simplex the base cancels).

- ``fuse_static``: fixed weights from the spec; ``fuse_uniform``: ``w_i = 1/n``.
- ``fuse_dynamic``: per-example weights on the simplex, found by exponentiated-gradient (mirror
  descent) steps on the KL-constrained problem

      maximise  KL(q_w || uniform)              (move as far as possible: a decided answer ...)
      s.t.      (1/n) Σ_i KL(q_w || p_i) <= ε    (... within a KL budget of every teacher)

  with ``q_w = softmax(Σ_i w_i z_i / T)`` and ``p_i = softmax(z_i / T)``. Its Lagrangian is the
  objective minimised here (λ = ``sharpness``, constants dropped):

      J(w) = (1/n) Σ_i KL(q_w || p_i) + λ · H(q_w)

  Why not the plain ``Σ_i KL(q_w || p_i)``: on the log-linear family it equals
  ``n · KL(q_w || g) + const`` with ``g`` the normalised geometric mean of the p_i, which *is*
  ``q_w`` at uniform weights, so its minimiser is always the uniform average and it can never
  adapt per example. The KL-budget term keeps that uniform consensus as the anchor (λ = 0 gives
  exactly ``fuse_uniform``); the λ·H term lets each example move weight towards the teachers that
  agree on a confident answer and away from those that pull the fused distribution apart (e.g. a
  specialist asked about classes it never saw). Each step is accepted only if it lowers J, so the
  result's objective is never above the uniform average's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_SHARPNESS = 0.5  # λ of the dynamic objective (the spec's FusionConfig has no key for it yet)

Logits = torch.Tensor | np.ndarray


def _stack(logits_list: Sequence[Logits]) -> torch.Tensor:
    """(n teachers) x (N, C) -> one (n, N, C) float32 tensor (no gradient: teachers are frozen)."""
    if len(logits_list) == 0:
        raise ValueError("fusion needs at least one teacher's logits")
    z = torch.stack(
        [
            t.detach().float() if isinstance(t, torch.Tensor) else torch.tensor(np.asarray(t), dtype=torch.float32)
            for t in logits_list
        ]
    )
    if z.ndim != 3:
        raise ValueError(f"each teacher's logits must be (N, C); got stacked shape {tuple(z.shape)}")
    return z


def _combine(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ni,inc->nc", w, z)


def fuse_static(logits_list: Sequence[Logits], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_i w_i z_i`` with the same weights for every row (used as given, not renormalised)."""
    z = _stack(logits_list)
    if len(weights) != z.shape[0]:
        raise ValueError(f"{len(weights)} weights for {z.shape[0]} teachers")
    w = (
        torch.tensor([float(x) for x in weights], dtype=torch.float32, device=z.device)
        .expand(z.shape[1], -1)
        .contiguous()
    )
    return _combine(z, w), w


def fuse_uniform(logits_list: Sequence[Logits]) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform average of the teachers' logits (the normalised geometric mean of their softmaxes)."""
    n = len(logits_list)
    return fuse_static(logits_list, [1.0 / n] * n)


def fusion_objective(
    logits_list: Sequence[Logits] | torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 1.0,
    sharpness: float = DEFAULT_SHARPNESS,
) -> torch.Tensor:
    """Per-row ``J(w) = (1/n) Σ_i KL(q_w || p_i) + λ·H(q_w)`` (see the module docstring)."""
    z = logits_list if isinstance(logits_list, torch.Tensor) and logits_list.ndim == 3 else _stack(logits_list)
    lp = F.log_softmax(z / temperature, dim=-1)
    return _objective(z, lp.mean(0), weights, temperature, sharpness)[0]


def _objective(
    z: torch.Tensor, mean_lp: torch.Tensor, w: torch.Tensor, T: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lq = F.log_softmax(_combine(z, w) / T, dim=-1)
    q = lq.exp()
    # (1/n) Σ_i KL(q || p_i) = Σ q log q - Σ q · mean_i log p_i ;  H(q) = -Σ q log q
    v = (1.0 - lam) * lq - mean_lp
    return (q * v).sum(-1), q, v


def fuse_dynamic(
    logits_list: Sequence[Logits],
    temperature: float = 1.0,
    steps: int = 50,
    sharpness: float = DEFAULT_SHARPNESS,
    init: Sequence[float] | None = None,
    step_size: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example simplex weights minimising ``J(w)`` by exponentiated-gradient steps.

    Returns ``(fused logits (N, C), weights (N, n))``. Starts at ``init`` (default uniform); each
    row keeps its own step size, grown after an accepted step and halved after a rejected one, so
    ``J`` never increases. The gradient is analytic: ``∂J/∂w_j = Cov_q(z_j, v) / T`` with
    ``v = (1-λ)·log q - mean_i log p_i``.
    """
    z = _stack(logits_list)
    n, N, _ = z.shape
    T = float(temperature)
    mean_lp = F.log_softmax(z / T, dim=-1).mean(0)
    if init is None:
        w = torch.full((N, n), 1.0 / n, device=z.device)
    else:
        w0 = torch.tensor([float(x) for x in init], dtype=torch.float32, device=z.device).clamp_min(0)
        if len(w0) != n or float(w0.sum()) <= 0:
            raise ValueError(f"init needs {n} non-negative weights with a positive sum")
        w = (w0 / w0.sum()).expand(N, -1).contiguous()
    J, q, v = _objective(z, mean_lp, w, T, sharpness)
    eta = torch.full((N, 1), float(step_size), device=z.device)
    for _ in range(int(steps)):
        vc = v - (q * v).sum(-1, keepdim=True)
        grad = torch.einsum("inc,nc->ni", z, q * vc) / T
        grad = grad - grad.min(1, keepdim=True).values  # EG is shift-invariant per row; keeps exp() <= 1
        cand = w * torch.exp(-eta * grad)
        cand = cand / cand.sum(1, keepdim=True)
        Jc, qc, vcand = _objective(z, mean_lp, cand, T, sharpness)
        ok = (Jc <= J)[:, None]
        w = torch.where(ok, cand, w)
        J = torch.where(ok[:, 0], Jc, J)
        q = torch.where(ok, qc, q)
        v = torch.where(ok, vcand, v)
        eta = torch.where(ok, eta * 1.5, eta * 0.5)
    return _combine(z, w), w


class FusionLossParams(BaseModel):
    """The fusion settings every train-time fusion loss takes (`fusion_kd`, `token_fusion_kl`);
    a loss adds `teachers` (with its own minimum) and its divergence's settings."""

    model_config = ConfigDict(extra="forbid")
    teachers: list[str]
    mode: Literal["static", "uniform", "dynamic"] = "dynamic"
    weights: list[float] | None = Field(None, description="static weights (one per teacher); dynamic: starting weights")
    fusion_temperature: float = Field(1.0, gt=0, description="temperature of the dynamic fusion objective")
    steps: int = Field(50, ge=1, description="exponentiated-gradient steps of dynamic fusion")
    sharpness: float = Field(DEFAULT_SHARPNESS, ge=0, description="λ of the dynamic objective (0 = uniform average)")

    @model_validator(mode="after")
    def _weights(self) -> FusionLossParams:
        if self.weights is not None and len(self.weights) != len(self.teachers):
            raise ValueError(f"`weights` needs one weight per teacher ({len(self.teachers)}), got {len(self.weights)}")
        if self.mode == "static" and self.weights is None:
            raise ValueError("mode 'static' needs `weights:` (one per teacher)")
        return self


def fuse(
    logits_list: Sequence[Logits],
    mode: str,
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    steps: int = 50,
    sharpness: float = DEFAULT_SHARPNESS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the spec's fusion ``mode``: static | uniform | dynamic."""
    if mode == "static":
        if weights is None:
            raise ValueError("fusion mode 'static' needs weights")
        return fuse_static(logits_list, weights)
    if mode == "uniform":
        return fuse_uniform(logits_list)
    if mode == "dynamic":
        return fuse_dynamic(logits_list, temperature, steps, sharpness, init=weights)
    raise ValueError(f"unknown fusion mode '{mode}' (static | uniform | dynamic)")


# --- teacher-side combiner: the `fused` cache -------------------------------------------------------
