"""Causal-LM distillation end to end on a real local Ray and MLflow: a (tiny, randomly initialised)
Hugging Face Llama saved with `save_pretrained` teaches WordNet glosses into the compressed top-k
cache, a smaller Llama student trains on it, and the registered model is a real Hugging Face model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdpipe.config import load_spec
from tests.test_lm_models import save_tiny_llama

pytestmark = pytest.mark.timeout(900)


def test_lm_pipeline_caches_compressed_topk_trains_and_registers_a_hf_model(ray_local, tmp_path: Path) -> None:
    import math

    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from kdpipe.lm.corpus import default_tokenizer
    from kdpipe.lm.topk_codec import decode_batch
    from kdpipe.pipeline import run

    # two teachers sharing a tokenizer, fused token by token (dynamic weights) into a third cache the
    # student learns from; the student takes its tokens and initial blocks from teacher `lm`
    teacher, teacher2 = tmp_path / "teacher", tmp_path / "teacher2"
    save_tiny_llama(teacher, default_tokenizer(), layers=2)
    save_tiny_llama(teacher2, default_tokenizer(), layers=2, seed=1)
    member = {"kind": "hf_causal_lm", "params": {"max_length": 24}, "outputs": ["tokens", "topk"], "topk": 16}
    cfg = load_spec(
        "pipelines/lm_distill.yaml",
        {
            "source.limit": 160,
            "teachers": [{"id": "lm", "path": str(teacher), **member}, {"id": "lm2", "path": str(teacher2), **member}],
            "teach.fusion": {"mode": "dynamic", "teachers": ["lm", "lm2"]},
            "losses": [
                {"name": "forward_kl", "weight": 1.0, "teacher": "fused"},
                {"name": "lm_ce", "weight": 1.0},
                # and the same two members fused again at train time, batch by batch, from their own caches
                {
                    "name": "token_fusion_kl",
                    "weight": 0.5,
                    "teachers": ["lm", "lm2"],
                    "mode": "static",
                    "weights": [0.25, 0.75],
                },
            ],
            "student.params": {"tokens_from": "lm", "num_layers": 1, "init_from_teacher_layers": [1]},
            "storage": tmp_path.as_uri(),
            "train.epochs": 1,
            "train.checkpoint_every": 1,
            "train.num_workers": 1,
            "train.batch_size": 8,
            "evaluate.slices": {"nouns": ["3-28"], "verbs": ["29-43"]},  # WordNet's noun and verb categories
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        },
    )
    assert cfg.student.params["teacher_path"] == str(teacher)  # the student reads the teacher's tokenizer
    res = run(cfg)

    # the cache: tokens + one compressed top-k blob per sequence, decodable to the teacher's top-16
    t = res.teach["lm"]
    part = pq.read_table(t.cache.files()[0])
    assert {"input_ids", "attention_mask", "topk_lm"} <= set(part.column_names)
    dec = decode_batch(part["topk_lm"], 24)
    mask = part["attention_mask"].combine_chunks().flatten().to_numpy().reshape(-1, 24).astype(bool)
    assert (dec.mask == mask).all() and dec.ids.shape[-1] == 16

    # the storage root as a URI (file:// here; s3:// etc. the same way): Ray Train wrote its checkpoints under it
    assert list((tmp_path / "ray_results").rglob("state.pt"))

    # the fused cache: the same tokens, a top-16 per token that is a distribution, per-row member weights
    import pyarrow as pa

    def rows(cache) -> pa.Table:
        return pa.concat_tables([pq.read_table(f) for f in cache.files()])

    fused, lm_rows = rows(res.teach["fused"].cache), rows(t.cache)
    tokens = lambda tab: dict(zip(tab["id"].to_pylist(), tab["input_ids"].to_pylist()))  # noqa: E731
    assert tokens(fused) == tokens(lm_rows)  # every row, the member's tokens
    fdec = decode_batch(fused["topk_lm"], 24)
    m = fdec.mask
    total = np.exp(fdec.logp[m].astype(np.float64)).sum(-1) + np.exp(fdec.tail_logp[m].astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-3)
    w = np.stack(fused["weights"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-4)

    # the train-time fusion ran every step with its static weights: its KL and weights are in the run
    hist = MlflowClient(res.tracking_uri).get_run(res.run_id).data.metrics
    assert math.isfinite(hist["train_token_fusion_kl"]) and hist["train_token_fusion_kl"] > 0
    assert (hist["train_token_fusion_kl.w_lm"], hist["train_token_fusion_kl.w_lm2"]) == pytest.approx((0.25, 0.75))

    # held-out metrics for student, twin and the teachers (the fused one as reference, each member on
    # its own, all from their caches); every one finite
    for k in (
        "test_ppl",
        "test_kl",
        "test_teacher_agreement",
        "test_teacher_ppl",
        "baseline_test_ppl",
        "test_teacher_lm_ppl",
        "test_teacher_lm2_ppl",
    ):
        assert math.isfinite(res.metrics[k]), k
    assert res.metrics["test_teacher_ppl"] > 1 and 0 <= res.metrics["test_teacher_agreement"] <= 1
    # ... and on each slice's glosses alone (per-domain perplexity), the teachers' included
    for k in ("test_nouns_ppl", "test_verbs_ppl", "baseline_test_nouns_ppl", "test_nouns_teacher_lm2_ppl"):
        assert math.isfinite(res.metrics[k]), k
    assert res.metrics["test_nouns_ppl"] != res.metrics["test_verbs_ppl"]
    assert "student [nouns]" in res.table and "baseline twin [verbs]" in res.table

    # the registry holds a Hugging Face model: a text-generation pipeline, loadable by from_pretrained
    client = MlflowClient(res.tracking_uri)
    params = client.get_run(res.run_id).data.params  # where it trained: fp32 on this CPU (no bf16 units)
    assert (params["train_device"], params["train_precision"]) == ("cpu", "fp32")
    mv = client.get_model_version(cfg.tracking.model_name, res.model_version)
    assert mv.tags["kdpipe.flavor"] == "transformers"
    mlflow.set_tracking_uri(res.tracking_uri)
    gen = mlflow.transformers.load_model(f"models:/{cfg.tracking.model_name}/{res.model_version}")
    out = gen("a domesticated animal", max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{cfg.tracking.model_name}/{res.model_version}", dst_path=str(tmp_path / "dl")
        )
    )
    model = AutoModelForCausalLM.from_pretrained(local / "model", local_files_only=True)
    assert model.config.num_hidden_layers == 1
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]  # no pickles in the registry


def test_lm_evaluator_sums_match_hand_computed_values() -> None:
    """One sequence of 3 real tokens (+1 pad), V = 4, teacher top-2 + tail: every metric by hand."""
    import math

    import torch

    from kdpipe.evaluators import EVALUATORS

    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    batch = {
        "input_ids": torch.tensor([[3, 3, 2, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0]]),
        "t.topk_ids": torch.tensor([[[0, 1], [3, 2], [1, 0], [0, 1]]]),
        "t.topk_logp": torch.log(torch.tensor([[[0.5, 0.3], [0.6, 0.2], [0.9, 0.05], [0.5, 0.5]]])),
        "t.tail_logp": torch.log(torch.tensor([[0.2, 0.2, 0.05, 1e-9]])),
    }

    class Fixed(torch.nn.Module):
        def forward(self, b):
            return {"logits": logits}

    ev = EVALUATORS.get("lm")()
    sums = ev.batch_sums(Fixed(), batch)
    # positions 0 and 1 predict tokens 3 and 2 (position 2 is the last real token: it predicts padding)
    lq = torch.log_softmax(logits[0, :2], dim=1)
    nll = -(lq[0, 3] + lq[1, 2])
    assert sums["tokens"] == 2 and math.isclose(sums["nll"], float(nll), rel_tol=1e-6)
    assert sums["correct"] == 1  # student argmax 0 (data: 3) and 2 (data: 2)
    assert sums["agree"] == 1  # teacher top-1 0 (= student's) and 3 (student: 2)
    assert sums["teacher_correct"] == 0
    # teacher log-prob of the data: pos 0 -> token 3 is in the tail (0.2 over V - k = 2 ids); pos 1 -> kept 0.2
    assert math.isclose(sums["teacher_nll"], -(math.log(0.1) + math.log(0.2)), rel_tol=1e-5)
    m = ev.finish(sums, {}, "test_")
    assert math.isclose(m["test_ppl"], math.exp(float(nll) / 2), rel_tol=1e-6)
