"""Cached vs online distillation for all-MiniLM-L6-v2 -> 2-layer students: time per epoch when the
teacher's embeddings come from the cache vs when the teacher runs every step (same student, rows,
batches, optimizer and loss; tokens are pre-computed in both, as the cache provides them).

Two students: full width (384, initialised from teacher layers) and the narrow one of
pipelines/minilm_narrow.yaml (width 192, projected to 384). The cache can at most remove the teacher's forward pass, so
the ratio is bounded by (teacher forward + student step) / student step; the bound is printed
from FLOP counts next to the measurement.

Those two loops are the ideal (in-memory tensors, one process). Beside them, in the same run,
kdpipe's real cached path for the full-width student: `pipelines/minilm_distill.yaml` on the same
glosses, the teach stage into the Parquet cache, then Ray Data streaming the cache into one Ray
Train worker with the same loss (embedding cosine); its epoch time comes from the per-epoch metric
timestamps in MLflow (epochs after the first; each includes the validation pass the ideal loops do
not run). Rates are train rows per second.

    python bench/minilm_cached_vs_online.py"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import best_of, cached_path_rates, save  # noqa: E402

STUDENTS = {
    "2-layer, width 384 (teacher layers 0,5)": {"layers": 2, "init_from_teacher": [0, 5]},
    "2-layer, width 192 (pipelines/minilm_narrow.yaml)": {
        "layers": 2,
        "init_from_teacher": None,
        "hidden_size": 192,
        "num_heads": 6,
        "intermediate_size": 768,
        "out_dim": 384,
        "init_embeddings": True,
    },
}


def _layer_flops(tokens: int, seq: int, hidden: int, inter: int) -> float:
    """Forward FLOPs of one BERT layer: projections + FFN + attention scores/mixing."""
    return 2 * tokens * (4 * hidden * hidden + 2 * hidden * inter) + 4 * tokens * seq * hidden


def main(sentences: int = 512, batch: int = 32) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from kdpipe.config import SourceConfig, load_spec
    from kdpipe.datasets.wordnet import read_wordnet
    from kdpipe.train import StudentMeta, build_student, make_optimizer
    from teachers.hf_encoder import HFEncoderTeacher, mean_pool

    cfg = load_spec(ROOT / "pipelines" / "minilm_distill.yaml")
    tcfg = cfg.teachers[0]
    d = HFEncoderTeacher.model_dir(tcfg)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    teacher = AutoModel.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
    tc = teacher.config
    seq = int(tcfg.params["max_length"])
    texts = [r["text"] for r in read_wordnet(SourceConfig(kind="wordnet", limit=sentences))[0]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")

    def teach(i: int) -> torch.Tensor:
        with torch.no_grad():
            out = teacher(
                input_ids=enc["input_ids"][i : i + batch], attention_mask=enc["attention_mask"][i : i + batch]
            )
            return F.normalize(mean_pool(out.last_hidden_state, enc["attention_mask"][i : i + batch]), dim=-1)

    cached = torch.cat([teach(i) for i in range(0, sentences, batch)])
    t_fwd = _layer_flops(batch * seq, seq, tc.hidden_size, tc.intermediate_size) * tc.num_hidden_layers
    results = {}
    for name, over in STUDENTS.items():
        params = {**cfg.student.params, **over, "relations": False}
        student = build_student(cfg.student.kind, params, StudentMeta(None, 0, [tcfg.id], {}))
        ids_key, mask_key = student.serving_inputs
        opt = make_optimizer(student.parameters(), 1e-4)  # what kdpipe's training loop uses

        def epoch(online: bool) -> None:
            student.train()
            for i in range(0, sentences, batch):
                target = teach(i) if online else cached[i : i + batch]
                emb = student(
                    {ids_key: enc["input_ids"][i : i + batch], mask_key: enc["attention_mask"][i : i + batch]}
                )["embedding"]
                loss = (1 - F.cosine_similarity(emb, target)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()

        epoch(False)  # warm-up
        t_cached = best_of(lambda: epoch(False), 3)
        t_online = best_of(lambda: epoch(True), 3)
        h = over.get("hidden_size", tc.hidden_size)
        s_step = (
            3 * _layer_flops(batch * seq, seq, h, over.get("intermediate_size", tc.intermediate_size)) * over["layers"]
        )
        results[name] = {
            "epoch_s_cached": t_cached,
            "epoch_s_online": t_online,
            "speedup": t_online / t_cached,
            "flop_bound": (t_fwd + s_step) / s_step,
            "student_params_m": sum(p.numel() for p in student.parameters()) / 1e6,
        }
        print(
            f"MiniLM (6 layers) -> {name}, {sentences} glosses: cached {t_cached:.2f} s/epoch, online "
            f"{t_online:.2f} s/epoch -> cache is {t_online / t_cached:.2f}x faster (FLOP bound "
            f"{results[name]['flop_bound']:.2f}x)"
        )
    full = results[next(iter(STUDENTS))]
    real = real_path(sentences, batch)
    ideal = {k: sentences / full[f"epoch_s_{k}"] for k in ("cached", "online")}
    out = {
        "sentences": sentences,
        "batch_size": batch,
        "max_length": seq,
        "teacher_layers": tc.num_hidden_layers,
        "students": results,
        "threads": torch.get_num_threads(),
        "ideal_rows_per_s_full_width": ideal,
        "kdpipe_cached_path": real,
        "kdpipe_cached_vs_ideal_online": real["rows_per_s"] / ideal["online"],
        "kdpipe_cached_vs_ideal_cached": real["rows_per_s"] / ideal["cached"],
    }
    print(
        f"kdpipe's cached path (full width, 1 Ray Train worker): {real['rows_per_s']:.1f} train rows/s = "
        f"{out['kdpipe_cached_vs_ideal_online']:.2f}x the ideal online loop, {out['kdpipe_cached_vs_ideal_cached']:.2f}x "
        f"the ideal cached loop"
    )
    save("cached_vs_online_minilm", out)
    return out


def real_path(sentences: int, batch: int, epochs: int = 4) -> dict:
    """kdpipe's cached path on `sentences` glosses: teach, then `distil` the full-width student with
    one Ray Train worker and the ideal loops' loss; seconds per epoch from the MLflow timestamps."""
    import tempfile

    from kdpipe.config import load_spec
    from kdpipe.pipeline import distil, prepare, teach

    tmp = Path(tempfile.mkdtemp(prefix="kdbench-minilm-cvo-"))
    over = next(iter(STUDENTS.values()))
    cfg = load_spec(
        ROOT / "pipelines" / "minilm_distill.yaml",
        {
            "source.limit": sentences,
            "teachers.0.outputs": ["embedding", "tokens"],
            "storage": str(tmp),
            "student.params.layers": over["layers"],
            "student.params.init_from_teacher": over["init_from_teacher"],
            "student.params.relations": False,
            "losses": [{"name": "embedding_cosine", "weight": 1.0}],
            "train.epochs": epochs,
            "train.batch_size": batch,
            "train.lr": 1e-4,
            "train.num_workers": 1,
            "train.checkpoint_every": epochs,
            "evaluate.baseline": False,
            "tracking.tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
            "tracking.gates": {"metric": "test_cosine", "min_gain_over_baseline": None},
        },
    )
    source, uri = prepare(cfg)
    res = distil(cfg, source, teach(cfg, source), uri)
    return cached_path_rates(uri, res.run_id, epochs)


if __name__ == "__main__":
    main()
