"""The CUDA path: teacher actors on a GPU in bf16, Ray Train workers with `use_gpu` under bf16
autocast, and what they produce on the CPU side (checkpoints a GPU-less driver reads, a registered
model that loads on CPU). The CUDA tests skip without a GPU; on a GPU machine run them with pytest,
and `scripts/gpu_check.py` for the measurements (README, "On a GPU")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdpipe.config import load_spec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_precision_is_fp32_on_cpu_and_bf16_needs_a_gpu() -> None:
    from kdpipe.config import SpecError
    from kdpipe.train import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    with pytest.raises(SpecError, match=r"train.*precision bf16 needs `use_gpu: true`"):
        load_spec("pipelines/digits_kd.yaml", {"train.precision": "bf16"})


def test_widen_moves_to_the_device_and_widens_fp16_only() -> None:
    from kdpipe.train import widen

    out = widen({"a": torch.ones(2, dtype=torch.float16), "b": torch.ones(2, dtype=torch.int64)}, torch.device("cpu"))
    assert out["a"].dtype == torch.float32 and out["b"].dtype == torch.int64


@cuda
def test_causal_lm_teacher_on_cuda_runs_bf16_and_agrees_with_fp32_on_cpu(tmp_path: Path) -> None:
    from kdpipe.config import TeacherConfig
    from kdpipe.lm.corpus import default_tokenizer
    from teachers.hf_causal_lm import HFCausalLMTeacher
    from tests.test_lm_models import save_tiny_llama

    save_tiny_llama(tmp_path, default_tokenizer(), layers=2)
    tcfg = TeacherConfig(
        id="lm", kind="hf_causal_lm", path=str(tmp_path), params={"max_length": 24}, outputs=["tokens", "topk"], topk=8
    )
    gpu, cpu = HFCausalLMTeacher.load(tcfg, "cuda"), HFCausalLMTeacher.load(tcfg, "cpu")
    assert next(gpu.model.parameters()).dtype == torch.bfloat16
    assert next(cpu.model.parameters()).dtype == torch.float32
    texts = {"text": ["a domesticated carnivorous mammal", "move fast by using one's feet", "of great size"]}
    g, c = gpu.forward(texts), cpu.forward(texts)
    mask = c["attention_mask"].astype(bool)
    # bf16 keeps ~3 significant digits: the top-1 token agrees and its log-prob is close
    top1 = (g["topk_ids"][..., 0] == c["topk_ids"][..., 0])[mask].mean()
    assert top1 >= 0.9, top1
    assert abs(g["topk_logp"][..., 0] - c["topk_logp"][..., 0])[mask].max() < 0.1


@cuda
def test_lm_pipeline_teaches_on_gpu_trains_with_use_gpu_and_registers_a_cpu_loadable_model(
    ray_local, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from kdpipe.lm.corpus import default_tokenizer
    from kdpipe.pipeline import run
    from tests.test_lm_models import save_tiny_llama

    teacher = tmp_path / "teacher"
    save_tiny_llama(teacher, default_tokenizer(), layers=2)
    cfg = load_spec(
        "pipelines/lm_distill.yaml",
        {
            "source.limit": 160,
            "teachers.0.path": str(teacher),
            "teachers.0.params": {"max_length": 24},
            "teachers.0.topk": 16,
            "student.params": {"tokens_from": "lm", "num_layers": 1, "init_from_teacher_layers": [1]},
            "teach.num_gpus": 1,
            "train.use_gpu": True,
            "train.num_workers": 1,
            "train.epochs": 2,
            "train.checkpoint_every": 1,
            "storage": str(tmp_path),
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        },
    )
    res = run(cfg)
    for k in ("test_ppl", "test_kl", "test_teacher_agreement", "baseline_test_ppl"):
        assert math.isfinite(res.metrics[k]), k
    params = MlflowClient(res.tracking_uri).get_run(res.run_id).data.params
    assert params["train_device"] == "cuda"
    assert params["train_precision"] == ("bf16 autocast" if torch.cuda.is_bf16_supported() else "fp32")
    mlflow.set_tracking_uri(res.tracking_uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{cfg.tracking.model_name}/{res.model_version}", dst_path=str(tmp_path / "dl")
        )
    )
    model = AutoModelForCausalLM.from_pretrained(local / "model", local_files_only=True)
    assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32


@cuda
def test_digits_pipeline_trains_on_gpu_and_beats_its_twin(ray_local, tmp_path: Path) -> None:
    from kdpipe.pipeline import run

    cfg = load_spec(
        "pipelines/digits_kd.yaml",
        {
            "teach.num_gpus": 0.5,
            "train.use_gpu": True,
            "train.num_workers": 1,
            "storage": str(tmp_path),
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        },
    )
    res = run(cfg)
    params = __import__("mlflow").tracking.MlflowClient(res.tracking_uri).get_run(res.run_id).data.params
    assert params["train_device"] == "cuda"
    assert res.metrics["test_acc"] > res.metrics["baseline_test_acc"], res.table
