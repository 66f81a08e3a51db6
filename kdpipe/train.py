"""The distil stage: a Ray Train `TorchTrainer` (DDP) over the cached teacher outputs."""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe import tracking
from kdpipe.lm.padding import trim_to_longest
from kdpipe.losses import LossContext
from kdpipe.losses.suite import LossSuite
from kdpipe.progress import EpochProgress
from kdpipe.runtime import default_cpus_per_worker
from kdpipe.spec import TrainConfig
from kdpipe.tracking import MetricsLogger
from kdpipe.views import small_materialised
from students import STUDENTS

log = logging.getLogger("kdpipe.train")


@dataclass
class StudentMeta:
    """What a student and its losses need to be built, independent of the data."""

    in_dim: int | None
    num_classes: int
    teachers: list[str]
    widths: dict[str, int]
    class_names: list[str] | None = None  # labels that were names: class i is class_names[i]
    feature_columns: list[str] | None = None  # a table's feature columns, in input order

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_student(kind: str, params: dict[str, Any], meta: StudentMeta) -> nn.Module:

    cls = STUDENTS.get(kind)
    return cls(in_dim=meta.in_dim, num_classes=meta.num_classes, **cls.Params(**params).model_dump())


class StudentFactory:
    """Builds a student with given weights wherever it is called (an evaluation actor, a test):
    picklable, numpy weights across the Ray boundary."""

    def __init__(self, kind: str, params: dict[str, Any], meta: StudentMeta, state: dict[str, torch.Tensor]) -> None:
        self.kind, self.params, self.meta = kind, params, meta
        self.state = {k: v.detach().cpu().numpy() for k, v in state.items()}

    def __call__(self) -> nn.Module:
        student = build_student(self.kind, self.params, self.meta)
        # copied: arrays fetched from the object store are read-only (torch warns on sharing them)
        student.load_state_dict({k: torch.tensor(v) for k, v in self.state.items()})
        return student.eval()


class DistilModule(nn.Module):
    """Student + losses in one module, so DDP also syncs learned loss parameters (projections)."""

    def __init__(self, student: nn.Module, losses: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.losses = losses

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.losses(self.student(batch), batch)


def accuracy_counts(out: dict[str, Any], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Correct-prediction counts for the final output and every exit (labeled rows only);
    nothing for students without class outputs (embedding students)."""
    if "logits" not in out or out["logits"].ndim != 2:  # embedding and token-level students: no class accuracy
        return {"n": labels.new_zeros((), dtype=torch.float)}
    mask = labels >= 0
    counts = {"acc": (out["logits"].argmax(1)[mask] == labels[mask]).sum().float()}
    for i, z in enumerate(out.get("exits") or []):
        counts[f"acc_exit{i}"] = (z.argmax(1)[mask] == labels[mask]).sum().float()
    counts["n"] = mask.sum().float()
    return counts


def _allreduce(sums: dict[str, float], device: torch.device | None = None, op: str = "sum") -> dict[str, float]:
    """Sum (or min) `sums` over the ranks, as one float64 tensor on the training device."""
    keys = sorted(sums)
    t = _allreduce_tensor(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device), op)
    return dict(zip(keys, t.tolist()))


def _allreduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` summed (or min-ed) over the ranks, in place; unchanged without a process group. The
    tensor must live on the training device: with `use_gpu` the process group is NCCL, which has
    no CPU backend (found on an H200: "No backend type associated with device type cpu")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t


def init_from_first_batch(student: nn.Module, batches: Any, device: torch.device) -> tuple[Any, int]:
    """A student that initialises itself from data (`data_init(batch, reduce)`, e.g. the early-exit
    heads of `hf_classifier`) sees the first batch of every rank before any step; a rank without
    rows passes None but still joins the reduction. Returns the batches, the first one included,
    and the rows (over all ranks) that `data_init` says it used, so the run can log them."""
    it = iter(batches)
    first = next(it, None)
    if first is not None:
        first = widen(first, device)  # widened once: `widen` leaves it as it is in the step
    rows = student.data_init(first, _allreduce_tensor)
    return (it if first is None else itertools.chain([first], it)), int(rows or 0)


def starts_fresh(student: nn.Module, job: Job, start_epoch: int) -> bool:
    """Whether the job's first epoch may run the student's `data_init`: only a student starting
    from its constructor's weights; a resumed or warm-started one carries trained weights."""
    return start_epoch == 0 and not job.init_state and callable(getattr(student, "data_init", None))


def epoch_batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int, epoch: int, rank: int) -> Any:
    """One epoch of torch batches; with a shuffle buffer the order changes every epoch, seeded by
    (seed, epoch, rank). Which rows a rank gets is Ray Data's streaming split, decided at run time,
    so the order is reproducible for a given shard, not across runs."""
    if not shuffle_buffer:
        return shard.iter_torch_batches(batch_size=batch_size)
    return shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=_shuffle_seed(seed, epoch, rank),
    )


def _shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31


class EpochReplay:
    """A worker's shard, kept in its memory after the first epoch when every rank's shard fits.

    Each epoch of a Ray Data shard is a new streaming execution: ~0.25 s here even for a shard of a
    few hundred rows, which is most of a small student's epoch. A shard whose tensors fit in
    `limit_bytes` on every rank is kept (as one tensor per column, dtype as streamed) after its first
    pass, and later epochs are sliced from memory: the same batches in the same order, or, with a
    shuffle buffer, a full shuffle of the shard seeded by (seed, epoch, rank). The ranks decide
    together (an all-reduce): Ray Data's streaming split starts an epoch only when every rank asks.
    """

    def __init__(self, shard: Any, limit_bytes: float, device: torch.device | None = None) -> None:
        self.shard, self.limit, self.device = shard, limit_bytes, device
        self.columns: dict[str, torch.Tensor] | None = None
        self.decided = limit_bytes <= 0

    def batches(self, batch_size: int, shuffle_buffer: int = 0, seed: int = 0, epoch: int = 0, rank: int = 0) -> Any:
        if self.columns is not None:
            yield from self._replay(batch_size, shuffle_buffer, seed, epoch, rank)
            return
        kept: list[dict[str, torch.Tensor]] | None = [] if not self.decided else None
        size = 0
        for batch in epoch_batches(self.shard, batch_size, shuffle_buffer, seed, epoch, rank):
            if kept is not None:
                size += sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor))
                if size <= self.limit and all(isinstance(v, torch.Tensor) for v in batch.values()):
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if not self.decided:
            self.decided = True
            if _allreduce({"fits": float(kept is not None)}, self.device, op="min")["fits"]:
                # every rank replays from now on (an empty shard too: no rank may ask Ray Data for an epoch alone)
                self.columns = {k: torch.cat([b[k] for b in kept]) for k in kept[0]} if kept else {}

    @classmethod
    def rank_share(
        cls, whole: Any, rows: int, rank: int, world: int, device: torch.device | None = None
    ) -> EpochReplay:
        """A small dataset of `rows` rows handed whole to every worker (`DataConfig.datasets_to_split`
        leaves it out): this rank reads it up to the end of its equal contiguous share, keeps only
        that share, and every epoch replays it.

        What Ray Data's equal streaming split gives a few-block dataset (rank r: rows r·m to
        (r+1)·m − 1 with m = rows // world, the remainder dropped so that every rank steps the same
        number of times), without the split's coordinator actor: each split dataset costs a process
        start, 1-2.5 s on 2 CPUs, before its first batch. Reading up to n rows per rank is the price."""
        m = rows // world
        lo, hi = rank * m, (rank + 1) * m
        kept: dict[str, list[torch.Tensor]] = defaultdict(list)
        at = 0
        for batch in whole.iter_torch_batches(batch_size=4096) if m else []:
            n = len(next(iter(batch.values())))
            if at + n > lo:
                for k, v in batch.items():  # copied: a view would keep the whole batch alive
                    kept[k].append(v[max(lo - at, 0) : hi - at].clone())
            at += n
            if at >= hi:
                break
        replay = cls(None, 0, device)
        replay.columns = {k: torch.cat(v) for k, v in kept.items()}
        got = len(next(iter(replay.columns.values()))) if replay.columns else 0
        if got != m:  # unequal shares would leave DDP's collectives waiting on the rank that ran out
            raise RuntimeError(f"rank {rank}: read {got} rows of its share of {m} (the dataset was counted at {rows})")
        replay.decided = True
        return replay

    def _replay(self, batch_size: int, shuffle_buffer: int, seed: int, epoch: int, rank: int) -> Any:
        assert self.columns is not None
        if not self.columns:
            return
        n = len(next(iter(self.columns.values())))
        order = None
        if shuffle_buffer:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_shuffle_seed(seed, epoch, rank)))
        for i in range(0, n, batch_size):
            if order is None:
                yield {k: v[i : i + batch_size] for k, v in self.columns.items()}
            else:
                idx = order[i : i + batch_size]
                yield {k: v.index_select(0, idx.to(v.device)) for k, v in self.columns.items()}  # kept on the GPU


def steps_per_epoch(ds: Any, train_cfg: TrainConfig) -> int:
    """Optimizer steps of one worker in one epoch (what the lr schedule spans); the views are
    materialised, so counting costs no pass over the data. Only needed by a non-constant schedule."""
    if train_cfg.lr_schedule == "constant" and not train_cfg.warmup_ratio:
        return 1
    return max(1, math.ceil(ds.count() / train_cfg.num_workers / train_cfg.batch_size))


def make_optimizer(params: Any, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW with PyTorch's fused kernel. On this CPU the default multi-tensor step of a 2-layer
    MiniLM student (most of it the embedding table) took 51.5 ms, the fused one 6.5 ms
    (`adamw_step` in bench/results/platform_costs.json)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def make_schedule(opt: torch.optim.Optimizer, train: TrainConfig, job: Job) -> Any:
    """The lr multiplier per optimizer step: linear warm-up over `warmup_ratio` of the job's steps,
    then constant or linear decay to 0 at its last step (the job's steps come from its rows)."""
    total = max(1, job.steps_per_epoch * job.epochs)
    warm = int(train.warmup_ratio * total)
    linear = train.lr_schedule == "linear"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm)) if linear else 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the run's jobs in order (the student, then its twin), each
    shard -> step -> evaluate -> report + checkpoint per epoch. One worker group serves every job:
    starting one costs ~9 s to the first batch here (bench/platform_costs.py), more than a small
    student's whole training."""
    import ray.train

    # rank 0 logs each epoch to MLflow; an outage must not stall training behind MLflow's retries
    # (7 with back-off by default): one try, a short timeout, and the logger buffers until next epoch
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    loop: LoopConfig = config["loop"].checked()
    # metrics rank 0 could not send yet travel in the checkpoints; the driver sends them at the end
    stats: dict[str, Any] = {"tracking_failures": 0, "unsent": [], "env": {}}
    done: dict[str, dict[str, torch.Tensor]] = {}  # finished jobs' student weights (in every checkpoint)
    resume: TrainState | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = TrainState.load(Path(d) / "state.pt")
        if ray.train.get_context().get_world_rank() == 0:
            note_restart(loop.tracking_uri, loop.run_id, ckpt.path, resume)
        done = dict(resume.done)
        stats["unsent"] = list(resume.unsent)
        stats["env"] = dict(resume.env)
    shards: dict[str, EpochReplay] = {}  # by dataset name: the student and its twin share the val shard (and
    for j, job in enumerate(loop.jobs):  # the train shard when the twin reads all train rows)
        if job.name not in done:
            at = resume if resume is not None and resume.job == j else None
            done[job.name] = train_job(loop, j, job, done, at, resumed=ckpt is not None, stats=stats, shards=shards)


def train_job(
    loop: LoopConfig,
    j: int,
    job: Job,
    done: dict[str, dict[str, torch.Tensor]],
    resume: TrainState | None,
    resumed: bool,
    stats: dict[str, Any],
    shards: dict[str, EpochReplay] | None = None,
) -> dict[str, torch.Tensor]:
    """One student's epochs on this worker's shard of `job.dataset`; returns its weights."""
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    train, meta = loop.train, loop.meta
    torch.manual_seed(loop.seed)
    student = build_student(loop.student_kind, job.student_params, meta)
    losses = LossSuite(job.losses, LossContext(meta.num_classes, meta.teachers, meta.widths))
    module = DistilModule(student, losses)
    if job.init_state:  # warm start / m2mKD modules
        module.student.load_state_dict({k: torch.as_tensor(v) for k, v in job.init_state.items()})
    model = ray.train.torch.prepare_model(module)  # moves it to this worker's device (a GPU with use_gpu)
    device = ray.train.torch.get_device()
    amp = autocast_dtype(train.precision, device)
    stats["env"][job.name] = {"device": device.type, "precision": precision_name(amp)}
    if rank == 0:
        log.info("training %s on %s (%s)", job.name, device, precision_name(amp))
    opt = make_optimizer(model.parameters(), train.lr, train.weight_decay)
    sched = make_schedule(opt, train, job)
    start = 0
    if resume is not None:
        _unwrap(model).load_state_dict(resume.module)
        opt.load_state_dict(resume.opt)
        sched.load_state_dict(resume.sched)
        start = resume.epoch + 1
    tracker = MetricsLogger(loop.tracking_uri, loop.run_id, prefix=job.prefix) if rank == 0 else None
    if tracker is not None and resumed:  # epochs replayed after a restart: MLflow holds the first run of them
        tracker.skip_through = tracker.last_step("train_loss")
    shards = {} if shards is None else shards
    limit = train.keep_in_memory_mb * 2**20
    world, whole = ray.train.get_context().get_world_size(), loop.whole
    for name in (job.dataset, "val"):
        if name not in shards:  # a view every worker reads whole (`fits_whole`), or this worker's split of it
            shard = ray.train.get_dataset_shard(name)
            shards[name] = (
                EpochReplay.rank_share(shard, whole[name], rank, world, device)
                if name in whole
                else EpochReplay(shard, limit, device)
            )
    train_shard, val_shard = shards[job.dataset], shards["val"]
    epochs = job.epochs
    fresh = starts_fresh(student, job, start)
    for epoch in range(start, epochs):
        metrics = run_epoch(
            model, opt, train_shard, val_shard, loop, epoch, rank, device, amp, sched, init=fresh and epoch == 0
        )
        if tracker is not None:
            tracker.log(metrics, step=epoch)
        # `ray.train.report` is a barrier across workers, so report only with checkpoints.
        if epoch == epochs - 1 or (epoch + 1) % train.checkpoint_every == 0:
            finished = dict(done)
            if epoch == epochs - 1:
                finished[job.name] = _student_state(model)
            unsent = stats["unsent"] + (_as_tuples(tracker.buffer) if tracker is not None else [])
            state = TrainState(
                j,
                epoch,
                _cpu(_unwrap(model).state_dict()),
                opt.state_dict(),
                sched.state_dict(),
                finished,
                unsent,
                dict(stats["env"]),
            )
            failures = stats["tracking_failures"] + (tracker.failures if tracker is not None else 0)
            report(state, {**metrics, "job": job.name, "tracking_failures": failures}, rank)
    if tracker is not None:
        stats["tracking_failures"] += tracker.failures
        stats["unsent"] += _as_tuples(tracker.buffer)
    return _student_state(model)


def note_restart(tracking_uri: str, run_id: str, checkpoint: str, resume: TrainState) -> None:
    """Rank 0 after a worker-group restart: the run says it restarted and from which checkpoint
    (`kdpipe.train.restarts`, `kdpipe.train.resumed_from`), which the driver reports when the fit ends."""
    try:
        client = tracking.client(tracking_uri)
        tags = client.get_run(run_id).data.tags
        client.set_tag(run_id, "kdpipe.train.restarts", str(int(tags.get("kdpipe.train.restarts", "0")) + 1))
        client.set_tag(
            run_id,
            "kdpipe.train.resumed_from",
            f"{checkpoint} (job {resume.job}, after epoch {resume.epoch})",
        )
    except Exception as e:  # noqa: BLE001 - tracking must never stop a resumed training
        log.warning("could not record the restart in MLflow: %s", e)
    log.warning(
        "training restarted: resumed from %s (job %s, after epoch %s)",
        checkpoint,
        resume.job,
        resume.epoch,
    )


def _as_tuples(metrics: list[Any]) -> list[tuple[str, float, int, int]]:
    return [(m.key, float(m.value), int(m.timestamp), int(m.step)) for m in metrics]


def send_unsent(tracking_uri: str, run_id: str, unsent: list[Any]) -> None:
    """Per-epoch metrics rank 0 could not deliver (MLflow was down until training ended), sent from
    the driver with MLflow's own retries; if MLflow is still down this raises, and the run fails
    with the error instead of finishing with a hole in its history."""
    from mlflow.entities import Metric

    metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in unsent]
    client = tracking.client(tracking_uri)
    tracking.log_metric_batch(client, run_id, metrics)
    log.warning(
        "sent %d per-epoch metrics that the training workers could not deliver while MLflow was down", len(metrics)
    )


def report_restarts(tracking_uri: str, run_id: str) -> None:
    """On the driver's console: a fit that survived a worker failure says so, and from where it resumed."""
    tags = tracking.client(tracking_uri).get_run(run_id).data.tags
    if tags.get("kdpipe.train.restarts"):
        log.warning(
            "training restarted %s time(s) after a worker failure; it resumed from %s",
            tags["kdpipe.train.restarts"],
            tags.get("kdpipe.train.resumed_from", "a checkpoint"),
        )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step: none (fp32) on CPU, whose bf16 is emulated here;
    bf16 on a CUDA device that has it ("auto"), fp32 where it does not. Weights, optimizer state
    and the losses' reductions stay fp32 either way (autocast keeps softmax/log-softmax in fp32)."""
    if precision == "fp32" or device.type != "cuda":
        return None
    if not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise RuntimeError(
                f"train.precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp32 or auto"
            )
        return None
    return torch.bfloat16


def precision_name(amp: torch.dtype | None) -> str:
    return "fp32" if amp is None else f"{str(amp).removeprefix('torch.').replace('bfloat16', 'bf16')} autocast"


def run_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train_shard: EpochReplay,
    val_shard: EpochReplay,
    loop: LoopConfig,
    epoch: int,
    rank: int,
    device: torch.device,
    amp: torch.dtype | None,
    sched: Any = None,
    init: bool = False,
) -> dict[str, float]:
    """One pass over the train shard and one over the val shard; metrics averaged over all ranks.
    With `init`, the student's `data_init` sees the first batch before the first step (and the
    rows it used are reported as `data_init_rows`)."""
    model.train()
    trim = trim_to_longest if getattr(_unwrap(model).student, "pads_to_longest", False) else (lambda b: b)
    sums: dict[str, float] = defaultdict(float)
    batches = train_shard.batches(loop.train.batch_size, loop.train.shuffle_buffer, loop.seed, epoch, rank)
    init_rows = None
    if init:
        batches, init_rows = init_from_first_batch(_unwrap(model).student, batches, device)
    for batch in batches:
        batch = trim(widen(batch, device))
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, parts = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        n = float(batch["label"].shape[0])
        sums["loss"] += float(loss.detach()) * n
        for k, v in parts.items():
            sums[k] += float(v) * n  # the loss suite hands its parts over detached
        sums["rows"] += n
    model.eval()
    vs: dict[str, float] = defaultdict(float)
    with torch.no_grad():
        for batch in val_shard.batches(512):
            batch = trim(widen(batch, device))
            for k, v in accuracy_counts(_unwrap(model).student(batch), batch["label"]).items():
                vs[k] += float(v)
    both = _allreduce({**{f"t.{k}": v for k, v in sums.items()}, **{f"v.{k}": v for k, v in vs.items()}}, device)
    sums = {k[2:]: v for k, v in both.items() if k.startswith("t.")}  # one collective per epoch, not two
    vs = {k[2:]: v for k, v in both.items() if k.startswith("v.")}
    metrics = {f"train_{k}": v / max(sums["rows"], 1) for k, v in sums.items() if k != "rows"}
    metrics.update({f"val_{k}": v / max(vs.get("n", 0), 1) for k, v in vs.items() if k != "n"})
    metrics["epoch"] = epoch
    if init_rows is not None:
        metrics["data_init_rows"] = init_rows  # the rows a data-initialised student's statistics came from
    return metrics


def report(state: TrainState, metrics: dict[str, Any], rank: int) -> None:
    """`ray.train.report` on every rank; rank 0 attaches the checkpoint (its weights = everyone's)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state.save(Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _student_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return _cpu(_unwrap(model).student.state_dict())


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the CPU: checkpoints are read by the driver, which may have no GPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def widen(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the worker's device, fp16 cache columns widened to fp32 there: they stay half
    the size in the object store and on the way to the GPU, and the losses compute in fp32."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)  # no copy when it is there already
        out[k] = v.float() if v.dtype == torch.float16 else v
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def storage_uri(path: str) -> str:
    """Ray Train's `storage_path`: a URI that pyarrow's filesystems resolve (`s3://`, `gs://`,
    `hdfs://`, `file://`) is passed as it is, so every node writes checkpoints to shared storage;
    a plain path is made absolute (Ray Train needs one)."""
    return path if "://" in path else str(Path(path).resolve())


@dataclass
class Job:
    """One student of a training run: which dataset it reads, its params and losses, its epochs,
    and the prefix of its metrics in the MLflow run ("" for the student, "baseline_" for its twin)."""

    name: str
    dataset: str
    student_params: dict[str, Any]
    losses: list[dict[str, Any]]
    epochs: int
    prefix: str = ""
    init_state: dict[str, Any] | None = None  # warm start / m2mKD modules: numpy across the Ray boundary
    steps_per_epoch: int = 1  # one worker's optimizer steps per epoch (what the lr schedule spans)

    def __post_init__(self) -> None:
        if self.init_state:
            self.init_state = {
                k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in self.init_state.items()
            }
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError(
                f"job {self.name}: epochs {self.epochs} and steps per epoch {self.steps_per_epoch} must be >= 1"
            )


@dataclass
class LoopConfig:
    """Everything the training workers need, typed: built once on the driver from the validated
    spec, checked again in every worker (`checked`), so no setting is restated with another default
    on the way."""

    train: TrainConfig
    meta: StudentMeta
    student_kind: str
    jobs: list[Job]
    seed: int
    tracking_uri: str
    run_id: str
    whole: dict[str, int] = field(default_factory=dict)  # views every worker reads whole, with their rows

    def checked(self) -> LoopConfig:
        """The config as a worker received it, revalidated (the train section through its pydantic model)."""
        return replace(
            self, train=TrainConfig.model_validate(self.train.model_dump()), jobs=[replace(j) for j in self.jobs]
        )


@dataclass
class TrainState:
    """What a checkpoint holds: where the run was (job, epoch), the module, optimizer and schedule
    states, the finished jobs' weights, the metrics rank 0 could not send yet, and where each job trained."""

    job: int
    epoch: int
    module: dict[str, torch.Tensor]
    opt: dict[str, Any]
    sched: dict[str, Any]
    done: dict[str, dict[str, torch.Tensor]]
    unsent: list[tuple[str, float, int, int]]
    env: dict[str, dict[str, str]]

    def save(self, path: Path) -> None:
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        return cls(**torch.load(path, weights_only=True, map_location="cpu"))


@dataclass
class FitResult:
    state: dict[str, torch.Tensor]  # the student's state dict
    env: dict[str, str] = field(
        default_factory=dict
    )  # where it trained: {"device": "cuda", "precision": "bf16 autocast"}


def fits_whole(ds: Any, limit_bytes: float) -> bool:
    """Whether every worker may read all of `ds` and keep its share in memory (`EpochReplay.rank_share`):
    a materialised dataset within the `keep_in_memory_mb` limit. Anything bigger, or lazy (the LM
    views decode per batch), is split by Ray Data and streamed."""

    return small_materialised(ds, limit_bytes)


def fit(
    *,
    name: str,
    datasets: dict[str, Any],
    jobs: list[Job],
    meta: StudentMeta,
    student_kind: str,
    train_cfg: TrainConfig,
    seed: int,
    tracking_uri: str,
    run_id: str,
    storage_path: str,
) -> dict[str, FitResult]:
    """Train every job's student, in order, in one `TorchTrainer` run over the Ray Datasets
    `datasets` ("val" is every job's validation split): a view within `train.keep_in_memory_mb`
    reaches every worker whole and each keeps its share (`fits_whole`), a bigger one is split by
    Ray Data and each worker streams its `get_dataset_shard`. Returns each job's final weights by name."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = train_cfg.cpus_per_worker or default_cpus_per_worker(train_cfg.num_workers)
    # views small enough for every worker to read whole, with their row counts (metadata: they are materialised)
    whole = {k: ds.count() for k, ds in datasets.items() if fits_whole(ds, train_cfg.keep_in_memory_mb * 2**20)}
    loop = LoopConfig(
        train=train_cfg,
        meta=meta,
        student_kind=student_kind,
        jobs=[replace(j, steps_per_epoch=steps_per_epoch(datasets[j.dataset], train_cfg)) for j in jobs],
        seed=seed,
        tracking_uri=tracking_uri,
        run_id=run_id,
        whole=whole,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name=f"{name}-{uuid.uuid4().hex[:8]}",
            storage_path=storage_uri(storage_path),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k not in whole]),
    )
    # a worker group's start-up is several seconds of silence on a small machine: say what is starting
    log.info(
        "training %s: starting %d Ray Train worker(s), %g CPU%s each",
        ", ".join(j.name for j in jobs),
        train_cfg.num_workers,
        cpus,
        " + 1 GPU" if train_cfg.use_gpu else "",
    )
    with EpochProgress(tracking_uri, run_id, [(f"{name}-{j.name}", j.prefix, j.epochs) for j in jobs]):
        result = trainer.fit()
    report_restarts(tracking_uri, run_id)
    if result.checkpoint is None:
        raise RuntimeError(f"training '{name}' finished without a checkpoint: {result.error}")
    if failures := (result.metrics or {}).get("tracking_failures"):
        log.warning(
            "MLflow was unreachable from the training workers %d time(s); their metrics were buffered and "
            "sent when it answered again (those still unsent when training ended are sent now)",
            failures,
        )
    with result.checkpoint.as_directory() as d:
        final = TrainState.load(Path(d) / "state.pt")
    done = final.done
    if final.unsent:
        send_unsent(tracking_uri, run_id, final.unsent)
    missing = [j.name for j in jobs if j.name not in done]
    if missing:
        raise RuntimeError(f"training '{name}' finished without weights for {missing}: {result.error}")
    return {j.name: FitResult(done[j.name], final.env.get(j.name, {})) for j in jobs}
