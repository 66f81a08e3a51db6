"""Causal-LM training step: sparse top-k KD vs dense KD, and a cached teacher vs an online one.

One training step of the README's LM student (`pipelines/lm_distill.yaml`: 2 Llama blocks from the
4 × 256 teacher, V = 30,522) on one batch of real glosses, forward KL + next-token CE, three ways:

  * cached top-k  — the teacher's k = 64 log-probs + tail bucket, as kdpipe's cache feeds them
  * cached dense  — all V teacher logits per token (what a dense logit cache would feed)
  * online dense  — the teacher runs forward on every step (classic online KD, no cache)
  * cached top-k, full width — the first, without cutting the batch's all-padding columns
    (`kdpipe.lm.padding`, which kdpipe's train loop applies and the other three rows use)

Step time is measured side by side (the variants take turns, step by step, in one process; the
median of each is reported) and turned into tokens/s over the batch's real next-token positions.
Peak memory is measured per variant in a fresh process (peak RSS of the steps over the RSS just
before them), so one variant's allocations cannot hide another's. The FLOP bound: a step costs
about 6 · P_s FLOPs per token for the student (forward + backward) and 2 · P_t more for an online
teacher, P counting every matmul weight (blocks and output layer, not the embedding lookup;
attention scores are left out: T ≤ 48 makes them < 5 %), over this CPU's measured fp32 matmul peak.
Writes bench/results/lm_train_step.json.

    python bench/lm_train_step.py [--batch 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import matmul_peak_gflops, save  # noqa: E402

VARIANTS = {
    "cached top-k": "topk",
    "cached dense": "dense",
    "online dense": "online",
    "cached top-k, full width": "topk-full",
}


def _spec(teachers_root: Path) -> Any:
    from kdpipe.config import load_spec
    from kdpipe.lm.pretrain import pretrain
    from teachers.hf_causal_lm import _params

    cfg = load_spec(ROOT / "pipelines" / "lm_distill.yaml", {"teachers.0.params.pretrain_root": str(teachers_root)})
    p = _params(cfg.teachers[0])
    pretrain(p.pretrain, root=p.pretrain_root)  # reused when it exists (≈10 min on 2 cores when not)
    return cfg


def make_inputs(cfg: Any, batch: int, out: Path) -> None:
    """One batch of real test glosses with the teacher's top-k cache columns and its dense logits,
    saved as safetensors (each variant's process loads only the columns it uses)."""
    import torch
    from safetensors.torch import save_file

    from kdpipe.lm.corpus import load_glosses
    from teachers.hf_causal_lm import HFCausalLMTeacher

    teacher = HFCausalLMTeacher.load(cfg.teachers[0])
    texts = load_glosses("test", limit=batch)
    res = teacher.forward({"text": texts})
    ids, mask = torch.from_numpy(res["input_ids"]).long(), torch.from_numpy(res["attention_mask"]).long()
    with torch.no_grad():
        dense = teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., : teacher.vocab].float()
    save_file(
        {
            "lm.input_ids": ids,
            "lm.attention_mask": mask,
            "input_ids": ids.clone(),
            "attention_mask": mask.clone(),
            "lm.topk_ids": torch.from_numpy(res["topk_ids"]).long(),
            "lm.topk_logp": torch.from_numpy(res["topk_logp"]),
            "lm.tail_logp": torch.from_numpy(res["tail_logp"]),
            "lm.logits": dense.contiguous(),
        },
        str(out),
    )


class Variant:
    """A student, its losses and optimizer, stepping on one way of getting the teacher's signal."""

    def __init__(self, cfg: Any, kind: str, inputs: Path) -> None:
        import torch
        from safetensors import safe_open

        from kdpipe.losses.base import LossContext
        from kdpipe.losses.suite import LossSuite
        from kdpipe.train import StudentMeta, build_student

        torch.manual_seed(0)
        self.trim = not kind.endswith("-full")
        kind = kind.removesuffix("-full")
        keep = {"topk": ("lm.topk_", "lm.tail_"), "dense": ("lm.logits",), "online": ()}[kind]
        with safe_open(str(inputs), "pt") as f:
            self.batch = {
                k: f.get_tensor(k).clone()
                for k in f.keys()  # in memory, not file-backed pages
                if k.endswith(("input_ids", "attention_mask")) or k.startswith(keep)
            }
        self.student = build_student(cfg.student.kind, cfg.student.params, StudentMeta(None, 0, ["lm"], {})).train()
        signal = "topk" if kind == "topk" else "dense"
        self.losses = LossSuite([{"name": "forward_kl", "signal": signal}, {"name": "lm_ce"}], LossContext(0, ["lm"]))
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=float(cfg.train.lr))
        self.teacher = None
        if kind == "online":
            from teachers.hf_causal_lm import HFCausalLMTeacher

            self.teacher = HFCausalLMTeacher.load(cfg.teachers[0])

    def step(self) -> None:
        import torch

        from kdpipe.lm.padding import trim_to_longest

        batch = trim_to_longest(self.batch) if self.trim else self.batch
        if self.teacher is not None:
            with torch.no_grad():
                out = self.teacher.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                )
            batch = {**batch, "lm.logits": out.logits[..., : self.teacher.vocab]}
        value, _ = self.losses(self.student(batch), batch)
        self.opt.zero_grad(set_to_none=True)
        value.backward()
        self.opt.step()


def matmul_params(model: Any) -> int:
    """Weights that multiply activations: every Linear (blocks and output layer), not embeddings."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def real_tokens(inputs: Path) -> int:
    from safetensors import safe_open

    from kdpipe.lm.token_functional import next_token_positions

    with safe_open(str(inputs), "pt") as f:
        return int(next_token_positions(f.get_tensor("attention_mask")).numel())


def time_side_by_side(cfg: Any, inputs: Path, steps: int, warmup: int = 3) -> dict[str, list[float]]:
    variants = {name: Variant(cfg, kind, inputs) for name, kind in VARIANTS.items()}
    for _ in range(warmup):
        for v in variants.values():
            v.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(steps):
        for name, v in variants.items():
            t = time.perf_counter()
            v.step()
            times[name].append(time.perf_counter() - t)
    return times


def peak_memory_of(kind: str, teachers_root: Path, inputs: Path, steps: int) -> dict[str, float]:
    """Run in a fresh process: the RSS before the first step and the peak RSS over `steps` steps."""
    import psutil

    cfg = _spec(teachers_root)
    v = Variant(cfg, kind, inputs)
    before = psutil.Process().memory_info().rss / 2**20
    for _ in range(steps):
        v.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "rss_before_steps_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "step_peak_over_before_mb": round(peak - before, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="glosses per step (the README spec's train.batch_size)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--teachers", default=str(ROOT / ".kdpipe" / "teachers"))
    ap.add_argument("--memory-of", choices=list(VARIANTS.values()), help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    teachers_root = Path(a.teachers).resolve()
    if a.memory_of:  # the per-variant child process
        print(json.dumps(peak_memory_of(a.memory_of, teachers_root, Path(a.inputs), 5)))
        return 0

    import torch

    cfg = _spec(teachers_root)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "batch.safetensors"
        make_inputs(cfg, a.batch, inputs)
        tokens = real_tokens(inputs)
        memory = {}
        for name, kind in VARIANTS.items():
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-of",
                    kind,
                    "--inputs",
                    str(inputs),
                    "--teachers",
                    str(teachers_root),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise RuntimeError(f"memory run of {name} failed:\n{out.stderr[-3000:]}")
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
        peak = matmul_peak_gflops()
        times = time_side_by_side(cfg, inputs, a.steps)
        probe = Variant(cfg, "online", inputs)
        p_s, p_t = matmul_params(probe.student), matmul_params(probe.teacher.model)  # type: ignore[union-attr]
        vocab, width = probe.teacher.vocab, tuple(probe.batch["input_ids"].shape)  # type: ignore[union-attr]
    flops = {
        "cached top-k": 6 * p_s,
        "cached dense": 6 * p_s,
        "online dense": 6 * p_s + 2 * p_t,
        "cached top-k, full width": 6 * p_s,
    }
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        bound = peak * 1e9 / flops[name]
        rows[name] = {
            "step_s_median": round(med, 4),
            "step_s_all": [round(t, 4) for t in ts],
            "tokens_per_s": round(tokens / med, 1),
            "flop_bound_tokens_per_s": round(bound, 1),
            "fraction_of_bound": round(tokens / med / bound, 3),
            **memory[name],
        }
    ratios = {
        "sparse_vs_dense_step_speedup": round(
            rows["cached dense"]["step_s_median"] / rows["cached top-k"]["step_s_median"], 3
        ),
        "sparse_vs_dense_peak_mb_saved": round(
            memory["cached dense"]["peak_rss_mb"] - memory["cached top-k"]["peak_rss_mb"], 1
        ),
        "cached_vs_online_speedup": round(
            rows["online dense"]["step_s_median"] / rows["cached top-k"]["step_s_median"], 3
        ),
        "cached_vs_online_flop_bound": round(flops["online dense"] / flops["cached top-k"], 3),
        "pad_to_longest_step_speedup": round(
            rows["cached top-k, full width"]["step_s_median"] / rows["cached top-k"]["step_s_median"], 3
        ),
    }
    data = {
        "command": "python bench/lm_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": {
            "sequences": width[0],
            "length": width[1],
            "real_next_tokens": tokens,
            "vocab": vocab,
            "topk": cfg.teachers[0].topk,
        },
        "params": {"student_matmul": p_s, "teacher_matmul": p_t},
        "matmul_peak_gflops": round(peak, 1),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "ratios": ratios,
    }
    path = save("lm_train_step", data)
    print(
        json.dumps(
            {
                "rows": {k: {kk: vv for kk, vv in v.items() if kk != "step_s_all"} for k, v in rows.items()},
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
