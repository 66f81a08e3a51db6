"""Throughput of an encoder teacher vs its Hugging Face student, measured side by side in one
process (same sentences, same batch size, same threads, interleaved rounds): all-MiniLM-L6-v2 vs
the hf_encoder student (embeddings), or the fine-tuned classifier vs the hf_classifier student
(logits) with the text-classifier spec.

    .venv/bin/python bench/minilm_speed.py [--spec pipelines/minilm_distill.yaml] [--batch-size 64]
    .venv/bin/python bench/minilm_speed.py --spec pipelines/text_classifier_distill.yaml \
        --out bench/results/text_classifier_speed.json

Sentences are WordNet glosses (the pipeline's data). Two timings per model: `model` (forward +
pooling on pre-tokenised, max_length-padded batches, what the student replaces) and `end_to_end`
(tokenisation included, dynamic padding to the longest sentence of the batch). Teacher and student
run on each batch back to back, alternating order, so a shared machine's load hits both alike; the
speed-up is the median over rounds of the paired ratio. Speed does not depend on the weights, so the student is
built from the spec (teacher-initialised layers). Writes bench/results/minilm_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "pipelines" / "minilm_distill.yaml"))
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "minilm_speed.json"))
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from kdpipe.config import SourceConfig, load_spec
    from kdpipe.datasets.wordnet import read_wordnet
    from kdpipe.train import StudentMeta, build_student
    from teachers import TEACHERS
    from teachers.hf_encoder import mean_pool

    torch.set_num_threads(args.threads)
    cfg = load_spec(args.spec)
    tcfg = cfg.teachers[0]
    max_length = int(tcfg.params["max_length"])
    d = TEACHERS.get(tcfg.kind).model_dir(tcfg)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    classifier = tcfg.kind == "hf_classifier"
    if classifier:
        from transformers import AutoModelForSequenceClassification as Auto
    else:
        Auto = AutoModel
    teacher = Auto.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
    num_classes = int(teacher.config.num_labels) if classifier else 0
    meta = StudentMeta(in_dim=None, num_classes=num_classes, teachers=[tcfg.id], widths={})
    student = build_student(cfg.student.kind, cfg.student.params, meta).eval()
    texts = [r["text"] for r in read_wordnet(SourceConfig(kind="wordnet", limit=args.sentences))[0]]
    batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    padded = [
        tok(b, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt") for b in batches
    ]
    ids_key, mask_key = student.serving_inputs

    def teacher_model(enc) -> torch.Tensor:
        out = teacher(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        if classifier:
            return out.logits
        return F.normalize(mean_pool(out.last_hidden_state, enc["attention_mask"]), dim=-1)

    def student_model(enc) -> torch.Tensor:
        return student({ids_key: enc["input_ids"], mask_key: enc["attention_mask"]})[student.serving_output]

    def encode(b: list[str], enc, end_to_end: bool):
        return tok(b, padding=True, truncation=True, max_length=max_length, return_tensors="pt") if end_to_end else enc

    def timed(fn, b: list[str], enc, end_to_end: bool) -> float:
        t0 = time.perf_counter()
        fn(encode(b, enc, end_to_end))
        return time.perf_counter() - t0

    def exit_model(depth: int):
        m = student.exit_model(depth)

        def run(enc) -> torch.Tensor:
            return m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits

        return run

    # The machine is shared: every model runs on the same batch back to back (the order rotating
    # from batch to batch), so load changes hit all alike; throughput = sentences / summed batch time.
    load_before = os.getloadavg()
    models = {"teacher": teacher_model, "student": student_model}
    for depth in getattr(student, "exit_depths", []):  # a multi-exit student: every early exit on its own
        models[f"exit_depth_{depth}"] = exit_model(depth)
    names = list(models)
    res: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for fn in models.values():  # warm-up
            for _, enc in zip(batches[:2], padded[:2]):
                fn(enc)
        for mode in ("model", "end_to_end"):
            rounds: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                spent = dict.fromkeys(names, 0.0)
                for i, (b, enc) in enumerate(zip(batches, padded)):
                    k = (i + r) % len(names)
                    for name in names[k:] + names[:k]:
                        spent[name] += timed(models[name], b, enc, mode == "end_to_end")
                for name in rounds:
                    rounds[name].append(len(texts) / spent[name])
            res[mode] = rounds
    summary = {}
    for mode, r in res.items():
        t, s = statistics.median(r["teacher"]), statistics.median(r["student"])
        ratios = [b / a for a, b in zip(r["teacher"], r["student"])]
        summary[mode] = {
            "teacher_sentences_per_s": round(t, 1),
            "student_sentences_per_s": round(s, 1),
            "speedup": round(statistics.median(ratios), 2),
            "speedup_min_max": [round(min(ratios), 2), round(max(ratios), 2)],
            "rounds": r,
        }
        for name in names[2:]:
            ratios = [b / a for a, b in zip(r["teacher"], r[name])]
            summary[mode][name] = {
                "sentences_per_s": round(statistics.median(r[name]), 1),
                "speedup": round(statistics.median(ratios), 2),
            }
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    result = {
        "bench": "minilm_speed",
        "spec": str(Path(args.spec).relative_to(ROOT)) if Path(args.spec).is_relative_to(ROOT) else args.spec,
        "sentences": len(texts),
        "batch_size": args.batch_size,
        "max_length": max_length,
        "threads": args.threads,
        "teacher": {"layers": int(teacher.config.num_hidden_layers), "params": n_params(teacher)},
        "student": {
            "kind": cfg.student.kind,
            "layers": len(student.layers),
            "params": n_params(student),
            "params_without_embeddings": n_params(student)
            - n_params(
                student.hf_model.embeddings
                if hasattr(student.hf_model, "embeddings")
                else student.hf_model.base_model.embeddings
            ),
        },
        "results": summary,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{len(texts)} WordNet glosses, batch {args.batch_size}, max_length {max_length}, {args.threads} threads "
        f"(load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; median of {args.rounds} rounds, paired per batch)"
    )
    print(
        f"{'':12} {'teacher (6 layers)':>20} {'student (' + str(len(student.layers)) + ' layers)':>20} {'speed-up':>9} {'(min-max)':>12}"
    )
    for mode, s in summary.items():
        lo, hi = s["speedup_min_max"]
        print(
            f"{mode:12} {s['teacher_sentences_per_s']:>16.1f}/s {s['student_sentences_per_s']:>16.1f}/s "
            f"{s['speedup']:>8.2f}x {lo:>5.2f}-{hi:.2f}"
        )
        for name in names[2:]:
            print(f"{'':12} {name:>20} {s[name]['sentences_per_s']:>16.1f}/s {s[name]['speedup']:>8.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
