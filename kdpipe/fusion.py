"""Logit fusion of several teachers ("On Giant's Shoulders: ... Dynamic Logits Fusion"), as tensor
functions (used at train time by the ``fusion_kd`` loss) and as a teacher-side combiner
(``fuse_caches``) that writes an extra ``fused`` teacher cache.

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

import logging
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from kdpipe.spec import PipelineConfig
    from kdpipe.data import SourceData
    from kdpipe.teach import TeachResult

log = logging.getLogger("kdpipe.fusion")

DEFAULT_SHARPNESS = 0.5  # λ of the dynamic objective (the spec's FusionConfig has no key for it yet)
FUSION_FORMAT = 1  # bumped when the fused outputs change for the same inputs, so old caches are not reused

Logits = torch.Tensor | np.ndarray


def _stack(logits_list: Sequence[Logits]) -> torch.Tensor:
    """(n teachers) x (N, C) -> one (n, N, C) float32 tensor (no gradient: teachers are frozen)."""
    if len(logits_list) == 0:
        raise ValueError("fusion needs at least one teacher's logits")
    z = torch.stack([t.detach().float() if isinstance(t, torch.Tensor) else torch.tensor(np.asarray(t), dtype=torch.float32)
                     for t in logits_list])
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
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=z.device).expand(z.shape[1], -1).contiguous()
    return _combine(z, w), w


def fuse_uniform(logits_list: Sequence[Logits]) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform average of the teachers' logits (the normalised geometric mean of their softmaxes)."""
    n = len(logits_list)
    return fuse_static(logits_list, [1.0 / n] * n)


def fusion_objective(logits_list: Sequence[Logits] | torch.Tensor, weights: torch.Tensor, temperature: float = 1.0,
                     sharpness: float = DEFAULT_SHARPNESS) -> torch.Tensor:
    """Per-row ``J(w) = (1/n) Σ_i KL(q_w || p_i) + λ·H(q_w)`` (see the module docstring)."""
    z = logits_list if isinstance(logits_list, torch.Tensor) and logits_list.ndim == 3 else _stack(logits_list)
    lp = F.log_softmax(z / temperature, dim=-1)
    return _objective(z, lp.mean(0), weights, temperature, sharpness)[0]


def _objective(z: torch.Tensor, mean_lp: torch.Tensor, w: torch.Tensor, T: float, lam: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lq = F.log_softmax(_combine(z, w) / T, dim=-1)
    q = lq.exp()
    # (1/n) Σ_i KL(q || p_i) = Σ q log q - Σ q · mean_i log p_i ;  H(q) = -Σ q log q
    v = (1.0 - lam) * lq - mean_lp
    return (q * v).sum(-1), q, v


def fuse_dynamic(logits_list: Sequence[Logits], temperature: float = 1.0, steps: int = 50,
                 sharpness: float = DEFAULT_SHARPNESS, init: Sequence[float] | None = None,
                 step_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
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
    def _weights(self) -> "FusionLossParams":
        if self.weights is not None and len(self.weights) != len(self.teachers):
            raise ValueError(f"`weights` needs one weight per teacher ({len(self.teachers)}), got {len(self.weights)}")
        if self.mode == "static" and self.weights is None:
            raise ValueError("mode 'static' needs `weights:` (one per teacher)")
        return self


def fuse(logits_list: Sequence[Logits], mode: str, weights: Sequence[float] | None = None, temperature: float = 1.0,
         steps: int = 50, sharpness: float = DEFAULT_SHARPNESS) -> tuple[torch.Tensor, torch.Tensor]:
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

def fused_fingerprint(cfg: "PipelineConfig", results: dict[str, "TeachResult"]) -> str:
    from kdpipe.cache import fingerprint

    f = cfg.teach.fusion
    assert f is not None
    return fingerprint({"kind": "fusion", "members": {t: results[t].fingerprint for t in f.teachers},
                        "fusion": f.model_dump(mode="json"), "sharpness": f.sharpness,
                        "format": FUSION_FORMAT})


def _member_logits(tid: str, block: Any, num_classes: int | None) -> np.ndarray:
    """Dense logits of one member teacher for the rows of a joined block (``<tid>.<column>``
    columns), rebuilt from its top-k when only that is cached."""
    from kdpipe.arrays import to_numpy
    from kdpipe.losses.functional import dense_from_topk

    if f"{tid}.logits" in block.column_names:
        return to_numpy(block[f"{tid}.logits"], np.float32)
    if f"{tid}.topk_idx" not in block.column_names:
        raise ValueError(f"fusion: teacher '{tid}' cache has neither `logits` nor `topk` outputs; "
                         f"add `outputs: [logits]` to that teacher")
    if num_classes is None:
        raise ValueError("fusion of top-k caches needs the number of classes (set source.num_classes)")
    rebuilt = dense_from_topk(torch.tensor(to_numpy(block[f"{tid}.topk_idx"]).astype(np.int64)),
                              torch.tensor(to_numpy(block[f"{tid}.topk_val"], np.float32)),
                              torch.tensor(to_numpy(block[f"{tid}.tail_lse"], np.float32)), num_classes)
    return rebuilt.numpy()


def fuse_block(block: Any, members: list[str], num_classes: int | None, mode: str, weights: Any, temperature: float,
               steps: int, sharpness: float) -> Any:
    """`map_batches` step: the members' outputs of a block of rows -> ``id``, fused ``logits`` and
    per-row fusion ``weights`` (every mode is per row, so blocks fuse independently)."""
    import pyarrow as pa

    from kdpipe.arrays import to_fixed_list

    torch.set_num_threads(1)
    logits = [_member_logits(t, block, num_classes) for t in members]
    fused, w = fuse(logits, mode, weights, temperature, steps, sharpness)
    return pa.table({"id": block["id"], "logits": to_fixed_list(fused.numpy().astype(np.float32)),
                     "weights": to_fixed_list(w.numpy().astype(np.float32))})


def _token_members(cfg: "PipelineConfig", members: list[str]) -> bool:
    """True when the members cache per-token top-k (causal LMs); mixing kinds is an error."""
    kinds = {t.id: "topk" in t.outputs and "tokens" in t.outputs for t in cfg.teachers if t.id in members}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"teach.fusion.teachers {members}: fuse either classifiers or causal LMs, not both "
                         f"(per-token caches: {sorted(k for k, v in kinds.items() if v)})")
    return any(kinds.values())


def fuse_token_block(block: Any, members: list[str], mode: str, weights: Any, temperature: float, steps: int,
                     sharpness: float) -> Any:
    """`map_batches` step for causal-LM members: their per-token top-k -> a fused top-k cache row
    (``id``, the shared ``input_ids`` / ``attention_mask``, ``topk_lm``, and ``weights``: each
    member's weight averaged over the row's tokens). See `kdpipe.lm.token_fusion`."""
    import pyarrow as pa

    from kdpipe.arrays import to_fixed_list
    from kdpipe.lm.token_fusion import fuse_topk
    from kdpipe.lm.topk_codec import COLUMN, decode_batch, encode_batch, read_header

    torch.set_num_threads(1)
    first = members[0]
    for m in members[1:]:
        if not block[f"{m}.input_ids"].equals(block[f"{first}.input_ids"]):
            raise ValueError(f"token fusion: teachers '{first}' and '{m}' tokenised the same rows differently; fuse "
                             "teachers that share a tokenizer and `max_length`")
    tokens = {"id": block["id"], "input_ids": block[f"{first}.input_ids"], "attention_mask": block[f"{first}.attention_mask"]}
    if block.num_rows == 0:
        return pa.table({**tokens, COLUMN: pa.array([], pa.binary()),
                         "weights": to_fixed_list(np.zeros((0, len(members)), np.float32))})
    seq_len = block[f"{first}.input_ids"].type.list_size
    dec = [decode_batch(block[f"{m}.{COLUMN}"], seq_len) for m in members]
    vocab = read_header(block[f"{first}.{COLUMN}"][0].as_py())["vocab_size"]
    fused, w = fuse_topk(dec, vocab, max(d.ids.shape[-1] for d in dec), mode, weights, steps, sharpness, temperature)
    lengths = fused.mask.sum(1)
    row_w = w.sum(1) / np.maximum(lengths, 1)[:, None]
    return pa.table({**tokens, **encode_batch(fused.ids, fused.logp, vocab, lengths=lengths, tail_logp=fused.tail_logp),
                     "weights": to_fixed_list(row_w.astype(np.float32))})


def fuse_caches(cfg: "PipelineConfig", source: "SourceData", results: dict[str, "TeachResult"]) -> "TeachResult":
    """Write (or reuse) the ``fused`` teacher cache: columns ``id``, ``logits`` (fused, fp32) and
    ``weights`` (per-example fusion weights, in ``teach.fusion.teachers`` order).

    Lives at ``<storage>/cache/fused/<fingerprint>/``; the fingerprint covers the member caches'
    fingerprints and the fusion config, so new teacher weights or settings never reuse old fusions.
    Incremental like ``teach_one``: only source rows the fused cache lacks are fused, in Ray Data
    (the member caches joined on `id`, fused block by block), staged, checked exactly-once and
    published by ``TeacherCache.commit`` under the cache's lock (manifest last).
    """
    from kdpipe import storage
    from kdpipe.cache import cache_at, staged_files
    from kdpipe.teach import TeachResult
    from kdpipe.todo import ID_BYTES, check_staged, rows_missing
    from kdpipe.views import Side, cache_side, join_on_id

    f = cfg.teach.fusion
    if f is None:
        raise ValueError("fuse_caches needs `teach.fusion` in the spec")
    missing = [t for t in f.teachers if t not in results]
    if missing:
        raise KeyError(f"fusion: no cache for teacher(s) {missing}; taught: {sorted(results)}")
    fp = fused_fingerprint(cfg, results)
    cache = cache_at(storage.Layout(cfg.storage).cache, "fused", fp)
    with cache.lock():
        cache.check_usable(cfg.teach.verify)
        todo = rows_missing(source, cache, max(2, cfg.teach.concurrency * 2))
        if todo.rows == 0:
            log.info("fused teacher: reusing cache %s (fingerprint %s)", cache.dir, fp)
            return TeachResult("fused", cache, fp, 0, True)
        ds = join_on_id([Side("todo", todo.index.select_columns(["id"]), todo.rows * ID_BYTES)]
                        + [cache_side(t, results[t].cache, cfg.teach.verify) for t in f.teachers])
        common = {"members": list(f.teachers), "mode": f.mode, "weights": f.weights, "temperature": f.temperature,
                  "steps": f.steps, "sharpness": f.sharpness}
        if _token_members(cfg, list(f.teachers)):  # causal LMs: fused token by token into the members' format
            from teachers import TEACHERS

            member = next(t for t in cfg.teachers if t.id == f.teachers[0])
            fn, kwargs, outputs = fuse_token_block, common, ["tokens", "topk", "weights"]
            write = TEACHERS.get(member.kind).parquet_options
        else:
            fn, outputs, write = fuse_block, ["logits", "weights"], {}
            kwargs = {**common, "num_classes": source.num_classes or cfg.source.num_classes}
        fused = ds.map_batches(fn, batch_format="pyarrow", batch_size=cfg.teach.batch_size, fn_kwargs=kwargs)
        header = {"teacher_id": "fused", "teacher_kind": "fusion", "fingerprint": fp, "weights_digest": "fusion",
                  "members": {t: results[t].fingerprint for t in f.teachers},
                  "fusion": {**f.model_dump(mode="json"), "sharpness": f.sharpness},
                  "output_spec": {"outputs": outputs, "format": FUSION_FORMAT}}
        with cache.staging() as staging:
            fused.write_parquet(str(staging), **write)
            got = sum(storage.parquet_metadata(p).num_rows for p in staged_files(staging))
            if got < todo.rows:  # the inner join dropped rows some member does not hold
                raise RuntimeError(f"fusion: the member caches lack {todo.rows - got} of {todo.rows} rows; "
                                   "run `kdpipe teach SPEC` first")
            check_staged(staging, todo.tally)
            manifest = cache.commit(staging, header, source.fingerprint, ids={"rows": todo.tally.rows,
                                                                              "digest": todo.tally.digest})
    log.info("fused teacher (%s over %s): %d new rows -> %s (now %d rows)", f.mode, f.teachers, todo.rows, cache.dir,
             manifest["rows"])
    return TeachResult("fused", cache, fp, todo.rows, False)
