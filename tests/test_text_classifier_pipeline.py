"""pipelines/text_classifier_distill.yaml end to end on a real local Ray and MLflow, shrunk: the
teacher is fine-tuned by kdpipe (a few steps) from all-MiniLM-L6-v2 on WordNet train glosses,
caches its logits and hidden states, a 1-layer BertForSequenceClassification student and its
labels-only twin train on the cache, and the registered champion is a text-classification model
that answers with WordNet's category names on raw text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kdpipe.config import load_spec

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="needs wordnet-base (make install)")]


@pytest.mark.slow  # fine-tune + MiniLM teaching + two TorchTrainer fits + registry: ≈ 3 min idle; `make test-all`
def test_text_classifier_pipeline_fine_tunes_teaches_distils_and_ships(ray_local, tmp_path: Path) -> None:
    import mlflow
    import mlflow.transformers
    from mlflow.tracking import MlflowClient

    from kdpipe.datasets.wordnet import LEXNAMES
    from kdpipe.pipeline import run

    cfg = load_spec("pipelines/text_classifier_distill.yaml", {
        "source.limit": 240,
        "teachers.0.params": {"max_length": 16, "layers": [3, 6], "finetune_root": str(tmp_path / "teachers"),
                              "finetune": {"steps": 4, "warmup_steps": 1, "batch_size": 8, "limit": 64, "eval_glosses": 20}},
        "student.params": {"tokens_from": "clf", "layers": 1, "init_from_teacher": [5], "relations": True},
        "losses": [{"name": "kd", "weight": 1.0, "temperature": 2.0}, {"name": "ce", "weight": 0.5},
                   {"name": "hidden_mse", "weight": 0.1, "layer_map": {1: 6}}, {"name": "minilm", "weight": 0.5}],
        "teach.cache_root": str(tmp_path / "cache"), "train.storage_path": str(tmp_path / "ray"), "train.epochs": 1,
        "train.checkpoint_every": 1, "train.num_workers": 1, "train.batch_size": 16,
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"})
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
