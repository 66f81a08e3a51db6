"""pipelines/text_classifier_distill.yaml end to end on a real local Ray and MLflow, shrunk: the
teacher is fine-tuned by kdpipe (a few steps) from all-MiniLM-L6-v2 on WordNet train glosses,
caches its logits and hidden states, a 1-layer BertForSequenceClassification student and its
labels-only twin train on the cache, and the registered champion is a text-classification model
that answers with WordNet's category names on raw text (`make test-all`). In the default suite: the
multi-exit student's data-dependent init inside a real two-worker Ray Train run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kdpipe.config import load_spec

pytestmark = pytest.mark.timeout(900)


@pytest.mark.slow  # fine-tune + MiniLM teaching + two TorchTrainer fits + registry: ≈ 3 min idle; `make test-all`
def test_text_classifier_pipeline_fine_tunes_teaches_distils_and_ships(ray_local, tmp_path: Path) -> None:
    import mlflow
    import mlflow.transformers
    from mlflow.tracking import MlflowClient

    from kdpipe.datasets.wordnet import LEXNAMES
    from kdpipe.pipeline import run

    cfg = load_spec(
        "pipelines/text_classifier_distill.yaml",
        {
            "source.limit": 240,
            "teachers.0.params": {
                "max_length": 16,
                "layers": [3, 6],
                "finetune_root": str(tmp_path / "teachers"),
                "finetune": {"steps": 4, "warmup_steps": 1, "batch_size": 8, "limit": 64, "eval_glosses": 20},
            },
            "student.params": {"tokens_from": "clf", "layers": 1, "init_from_teacher": [5], "relations": True},
            "losses": [
                {"name": "kd", "weight": 1.0, "temperature": 2.0},
                {"name": "ce", "weight": 0.5},
                {"name": "hidden_mse", "weight": 0.1, "layer_map": {1: 6}},
                {"name": "minilm", "weight": 0.5},
            ],
            "storage": str(tmp_path),
            "train.epochs": 1,
            "train.checkpoint_every": 1,
            "train.num_workers": 1,
            "train.batch_size": 16,
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        },
    )
    teacher_dir = Path(cfg.student.params["teacher_path"])
    assert teacher_dir.parent == tmp_path / "teachers" and not teacher_dir.exists()  # made by the run, once
    res = run(cfg)
    assert (teacher_dir / "config.json").is_file()

    for k in ("test_acc", "test_macro_f1", "baseline_test_acc", "baseline_test_macro_f1", "teacher_clf_test_acc"):
        assert math.isfinite(res.metrics[k]) and 0 <= res.metrics[k] <= 1, k

    client = MlflowClient(res.tracking_uri)
    mv = client.get_model_version(cfg.tracking.model_name, res.model_version)
    assert mv.tags["kdpipe.flavor"] == "transformers" and mv.tags["kdpipe.hf_task"] == "text-classification"
    mlflow.set_tracking_uri(res.tracking_uri)
    clf = mlflow.transformers.load_model(f"models:/{cfg.tracking.model_name}/{res.model_version}")
    out = clf(["a domesticated carnivorous mammal", "move fast by using one's feet"])
    assert all(o["label"] in LEXNAMES for o in out)  # the teacher's label names travel with the student


def test_multi_exit_student_folds_every_ranks_first_batch_inside_ray_train(ray_local, tmp_path: Path) -> None:
    """`hf_classifier`'s `data_init` inside a real Ray Train run with two DDP workers: each exit's
    pooler folds the statistics of the first batch of *both* ranks (here, every train row: one
    batch a rank), exactly what one process computes from all train rows. A run that skipped
    `data_init`, or folded one rank's rows alone, fails. The learning rate is too small to move
    the weights, so the registered weights are the fold's."""
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from kdpipe.model_registry import load_student_state
    from kdpipe.pipeline import distil, prepare, student_meta, teach
    from kdpipe.train import build_student
    from kdpipe.views import build_views
    from tests.test_hf_students import _classifier_teacher

    cfg = load_spec(
        "pipelines/text_classifier_hierarchical.yaml",
        {
            "source.limit": 120,
            "teachers.0.path": str(_classifier_teacher(tmp_path)),
            "teachers.0.params": {"max_length": 16, "layers": [6]},
            "teachers.0.outputs": ["logits", "tokens"],
            "student.params": {"tokens_from": "clf", "layers": 2, "init_from_teacher": [0, 5], "exits": [1]},
            "storage": str(tmp_path),
            "train.epochs": 1,
            "train.checkpoint_every": 1,
            "train.num_workers": 2,
            "train.batch_size": 512,
            "train.lr": 1e-12,
            "evaluate.baseline": False,
            "tracking.gates.min_gain_over_baseline": None,
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        },
    )
    source, uri = prepare(cfg)
    taught = teach(cfg, source)
    res = distil(cfg, source, taught, uri)

    train = build_views(source, {k: r.cache for k, r in taught.items()}).train
    cols = ["clf.input_ids", "clf.attention_mask"]
    rows = {
        k: torch.as_tensor(np.asarray(v))
        for k, v in train.select_columns(cols).take_batch(10_000, batch_format="numpy").items()
    }
    n = len(rows["clf.input_ids"])
    history = MlflowClient(uri).get_metric_history(res.run_id, "data_init_rows")
    assert [h.value for h in history] == [n]  # epoch 0 only, from both ranks' first batches: every train row

    meta = student_meta(cfg, source, train)  # (it runs a student too: before the seed)
    torch.manual_seed(cfg.seed)  # the workers' student before its first step
    want = build_student(cfg.student.kind, cfg.student.params, meta)
    assert want.data_init(rows, lambda t: t) == n
    got = load_student_state(MlflowClient(uri), res.run_id)
    for k, v in want.state_dict().items():
        if k.startswith("exit_heads.0.pooler"):
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    torch.manual_seed(cfg.seed)
    bert = build_student(cfg.student.kind, {**cfg.student.params, "exit_init": "bert"}, meta).state_dict()
    assert not torch.allclose(got["exit_heads.0.pooler.dense.weight"], bert["exit_heads.0.pooler.dense.weight"])
    torch.testing.assert_close(
        got["exit_heads.0.classifier.weight"], bert["exit_heads.0.classifier.weight"]
    )  # not folded
