"""Module-to-module KD (m2mKD): pre-train each student module on the teacher module it replaces.

The teacher's T layers are split into M consecutive modules (T/M layers each) and the student's
S layers likewise (S/M each). Student module j is trained, on its own, to map the cached hidden
state *entering* teacher module j (``<tid>.feat.<j·T/M>``) to the cached state *leaving* it
(``<tid>.feat.<(j+1)·T/M>``), with a token-masked MSE or cosine loss. The M trainings share
nothing, so they run in parallel as Ray tasks (one `@ray.remote` task per module, a fraction of a
CPU each); tensors cross the Ray boundary as numpy. The trained modules are then assembled into
one student state dict that `distil_and_ship` fine-tunes end to end (``init_state``).
The boundary states are matched directly (no shared meta model), which ALGORITHMS.md §3 allows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from kdpipe import tracking, weights
from kdpipe.errors import KdpipeError
from kdpipe.spec import PipelineConfig
from kdpipe.train import StudentMeta, build_student, make_optimizer
from teachers.hf_encoder import HFEncoderTeacher

log = logging.getLogger("kdpipe.m2mkd")


def module_plan(teacher_layers: int, student_layers: int, modules: int) -> list[dict[str, int]]:
    """Per module j: teacher layers [t0, t1) and student layers [s0, s1)."""
    if teacher_layers % modules or student_layers % modules:
        raise KdpipeError(
            f"m2mkd.modules={modules} must divide the teacher's {teacher_layers} layers and the "
            f"student's {student_layers} layers"
        )
    tm, sm = teacher_layers // modules, student_layers // modules
    return [{"module": j, "t0": j * tm, "t1": (j + 1) * tm, "s0": j * sm, "s1": (j + 1) * sm} for j in range(modules)]


def _boundary_loss(kind: str, out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(out.dtype)
    if kind == "cosine":
        per_tok = 1.0 - torch.nn.functional.cosine_similarity(out, target, dim=-1)
        return (per_tok * m).sum() / m.sum().clamp(min=1.0)
    return (((out - target) ** 2) * m[..., None]).sum() / (m.sum() * out.shape[-1]).clamp(min=1.0)


def layer_prefix(student: torch.nn.Module, i: int) -> str:
    """The state-dict prefix of the student's block i (`hf_model.encoder.layer.<i>.` for a BertModel)."""
    target = student.layers[i]
    return next(f"{name}." for name, m in student.named_modules() if m is target)


def train_module(
    plan: dict[str, int],
    job: dict[str, Any],
    init: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray,
    vx: np.ndarray,
    vy: np.ndarray,
    vmask: np.ndarray,
) -> dict[str, Any]:
    """Train student layers [s0, s1) to map x -> y (hidden states (N, L·H) fp16, mask (N, L)).

    Runs inside a Ray task; returns the module's weights (numpy) and its loss history.
    """

    start = time.time()
    torch.set_num_threads(max(1, int(job["threads"])))
    torch.manual_seed(job["seed"] + plan["module"])
    student = build_student(job["student_kind"], job["student_params"], StudentMeta(**job["meta"]))
    student.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in init.items()}, strict=False)
    s0, s1 = plan["s0"], plan["s1"]
    params = [p for layer in student.layers[s0:s1] for p in layer.parameters()]
    opt = make_optimizer(params, job["lr"])
    n, L = mask.shape
    g = torch.Generator().manual_seed(job["seed"] + 17 * plan["module"])

    def tensors(
        a: np.ndarray, b: np.ndarray, m: np.ndarray, idx: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(a[idx].astype(np.float32)).reshape(len(m[idx]), L, -1),
            torch.from_numpy(b[idx].astype(np.float32)).reshape(len(m[idx]), L, -1),
            torch.from_numpy(m[idx].astype(np.int64)),
        )

    history: list[dict[str, float]] = []
    for _ in range(job["epochs"]):
        student.train()
        perm = torch.randperm(n, generator=g).numpy()
        tot, rows = 0.0, 0
        for i in range(0, n, job["batch_size"]):
            idx = np.sort(perm[i : i + job["batch_size"]])
            hx, hy, m = tensors(x, y, mask, idx)
            loss = _boundary_loss(job["loss"], student.run_layers(hx, m, s0, s1), hy, m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss) * len(idx)
            rows += len(idx)
        student.eval()
        with torch.no_grad():
            vl, vrows = 0.0, 0
            for i in range(0, len(vmask), 256):
                idx = np.arange(i, min(i + 256, len(vmask)))
                hx, hy, m = tensors(vx, vy, vmask, idx)
                vl += float(_boundary_loss(job["loss"], student.run_layers(hx, m, s0, s1), hy, m)) * len(idx)
                vrows += len(idx)
        history.append({"train_loss": tot / max(rows, 1), "val_loss": vl / max(vrows, 1)})
    state = {
        f"{layer_prefix(student, i)}{k}": v.detach().cpu().numpy()
        for i in range(s0, s1)
        for k, v in student.layers[i].state_dict().items()
    }
    return {
        "module": plan["module"],
        "state": state,
        "history": history,
        "pid": os.getpid(),
        "start": start,
        "end": time.time(),
    }


def _column(col: str, dtype: str, *blocks: Any) -> np.ndarray:
    """One column of a materialised dataset's blocks as one (N, D) array, gathered inside a Ray task
    (the blocks arrive as task arguments; the driver holds only their object refs)."""
    parts = [
        np.asarray(chunk.to_numpy(zero_copy_only=False)).reshape(len(chunk), -1).astype(dtype, copy=False)
        for b in blocks
        if b.num_rows
        for chunk in b[col].chunks
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype)


def pretrain_modules(
    cfg: PipelineConfig, meta: Any, splits: dict[str, Any], run_id: str, tracking_uri: str
) -> dict[str, torch.Tensor]:
    """Run the M module trainings as parallel Ray tasks, log their losses to the MLflow run, and
    return the assembled student state dict (the `init_state` of the end-to-end fine-tune)."""
    import ray
    from mlflow.entities import Metric

    m = cfg.m2mkd
    assert m is not None
    tid = m.teacher
    if tid not in [t.id for t in cfg.teachers]:
        raise KdpipeError(f"m2mkd.teacher '{tid}' is not a teacher id; defined: {[t.id for t in cfg.teachers]}")
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student.kind, cfg.student.params, meta)
    if not hasattr(student, "run_layers") or not hasattr(student, "layers"):
        raise KdpipeError(
            f"m2mkd needs a modular student with `layers` and `run_layers` (e.g. hf_encoder), not '{cfg.student.kind}'"
        )
    tcfg = cfg.teacher(tid)

    if tcfg.kind != "hf_encoder":
        raise KdpipeError(f"m2mkd splits a transformer teacher into modules; teacher '{tid}' is a {tcfg.kind}")
    t_layers = int(
        json.loads((weights.local_copy(HFEncoderTeacher.model_dir(tcfg)) / "config.json").read_text())[
            "num_hidden_layers"
        ]
    )
    plan = module_plan(t_layers, len(student.layers), m.modules)
    boundaries = sorted({p["t0"] for p in plan} | {p["t1"] for p in plan})
    train, val = splits["train"], splits["val"]  # Ray Datasets
    missing = [f"{tid}.feat.{b}" for b in boundaries if f"{tid}.feat.{b}" not in meta.widths]
    if missing or f"{tid}.attention_mask" not in meta.widths:
        raise KdpipeError(
            f"m2mkd with {m.modules} modules needs the teacher's hidden states at layers {boundaries} and its "
            f"tokens: set teachers[{tid}].params.layers to include {boundaries} and outputs to include "
            f"'features' and 'tokens' (missing: {missing})"
        )
    hidden = student.config.hidden_size
    L = meta.widths[f"{tid}.attention_mask"]
    t_hidden = meta.widths[f"{tid}.feat.{boundaries[0]}"] // L
    if hidden != t_hidden:
        raise KdpipeError(
            f"m2mkd matches module boundary states directly: the student's hidden_size {hidden} must equal "
            f"the teacher's {t_hidden}"
        )
    if student.init_from_teacher is not None:
        log.info("m2mkd: student layers start from teacher layers %s", student.init_from_teacher)

    init_state = {k: v.detach().cpu().numpy() for k, v in student.state_dict().items()}
    gather = ray.remote(num_cpus=0.25)(_column)
    refs = {}
    for split, ds in (("train", train), ("val", val)):
        blocks = ds.to_arrow_refs()  # materialised views: refs to blocks already in the object store
        refs[(split, "mask")] = gather.remote(f"{tid}.attention_mask", "int8", *blocks)
        for b in boundaries:
            refs[(split, b)] = gather.remote(f"{tid}.feat.{b}", "float16", *blocks)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 2))
    cpus = max(0.1, min(1.0, cluster_cpus * 0.75 / m.modules))  # all modules at once, with room for the driver
    job = {
        "student_kind": cfg.student.kind,
        "student_params": cfg.student.params,
        "meta": meta.as_dict(),
        "epochs": m.epochs,
        "lr": m.lr,
        "batch_size": m.batch_size,
        "loss": m.loss,
        "seed": cfg.seed,
        "threads": max(1, int(cpus)),
    }
    remote = ray.remote(num_cpus=cpus, max_retries=1)(train_module)
    t0 = time.time()
    futures = []
    for p in plan:
        prefixes = tuple(layer_prefix(student, i) for i in range(p["s0"], p["s1"]))
        layer_init = {k: v for k, v in init_state.items() if k.startswith(prefixes)}
        futures.append(
            remote.remote(
                p,
                job,
                layer_init,
                refs[("train", p["t0"])],
                refs[("train", p["t1"])],
                refs[("train", "mask")],
                refs[("val", p["t0"])],
                refs[("val", p["t1"])],
                refs[("val", "mask")],
            )
        )
    results = sorted(ray.get(futures), key=lambda r: r["module"])
    wall = time.time() - t0

    client = tracking.client(tracking_uri)
    ts = int(time.time() * 1000)
    metrics = [
        Metric("m2mkd_wall_s", wall, ts, 0),
        Metric("m2mkd_task_s_sum", sum(r["end"] - r["start"] for r in results), ts, 0),
    ]
    for r in results:
        j = r["module"]
        for epoch, h in enumerate(r["history"]):
            metrics += [
                Metric(f"m2mkd_module{j}_train_loss", h["train_loss"], ts, epoch),
                Metric(f"m2mkd_module{j}_val_loss", h["val_loss"], ts, epoch),
            ]
        client.set_tag(
            run_id,
            f"kdpipe.m2mkd.module{j}",
            json.dumps({**plan[j], "pid": r["pid"], "start": r["start"], "end": r["end"], "cpus": cpus}),
        )
    tracking.log_metric_batch(client, run_id, metrics)
    log.info(
        "m2mkd: %d modules trained in parallel in %.1f s (%s)",
        len(results),
        wall,
        ", ".join(f"module {r['module']}: val {r['history'][-1]['val_loss']:.4f}" for r in results),
    )

    state = dict(init_state)
    for r in results:
        state.update(r["state"])
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
