"""Spec validation: every error names the YAML key and what is allowed, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe.config import SpecError, load_spec, parse_spec
from tests.conftest import ROOT


def _err(raw, overrides=None) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw, overrides)
    return str(e.value)


def test_default_pipeline_validates() -> None:
    cfg = load_spec("pipelines/digits_kd.yaml")
    assert cfg.losses[0].name == "kd" and cfg.losses[0].params()["temperature"] == 4.0
    assert cfg.teachers[0].topk == 4


def test_unknown_key_names_the_key(digits_spec_raw) -> None:
    digits_spec_raw["train"]["epochz"] = 3
    msg = _err(digits_spec_raw)
    assert "train.epochz" in msg and "unknown key" in msg


def test_unknown_loss_lists_available(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"losses.0.name": "kdd"})
    assert "losses[0].name" in msg and "unknown loss 'kdd'" in msg and "kd" in msg and "ce" in msg


def test_bad_loss_param_type(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"losses.0.temperature": "hot"})
    assert "losses[0]" in msg and "temperature" in msg


def test_unknown_loss_param(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"losses.0.temprature": 2.0})
    assert "temprature" in msg


def test_unknown_teacher_and_student_kind(digits_spec_raw) -> None:
    assert "unknown teacher kind 'gpt9'" in _err(digits_spec_raw, {"teachers.0.kind": "gpt9"})
    msg = _err(digits_spec_raw, {"student.kind": "resnet1000"})
    assert "student.kind" in msg and "mlp" in msg


def test_bad_type_names_key(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"train.epochs": "many"})
    assert "train.epochs" in msg and "'many'" in msg


def test_topk_output_requires_k(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"teachers.0.topk": None})
    assert "teachers[0]" in msg and "topk" in msg


def test_loss_teacher_reference_checked(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"losses.0.teacher": "nobody"})
    assert "losses[0].teacher 'nobody'" in msg


def test_file_source_needs_path(digits_spec_raw) -> None:
    digits_spec_raw["source"] = {"kind": "parquet", "features": "x"}
    assert "source" in (msg := _err(digits_spec_raw)) and "path" in msg


def test_missing_spec_file() -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec("pipelines/nope.yaml")


def test_cli_reports_spec_error_before_ray(tmp_path, capsys) -> None:
    import ray

    from kdpipe.cli import main

    was_up = ray.is_initialized()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nsource: {kind: sklearn_digits}\nteachers: []\nstudent: {kind: mlp}\nlosses: [{name: nope}]\ntracking: {model_name: m}\n"
    )
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec error" in err and "teachers" in err and "losses[0].name" in err
    assert ray.is_initialized() == was_up  # failed before starting Ray


def test_a_data_path_that_names_nothing_is_a_spec_error_relative_to_the_spec(tmp_path, capsys) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.csv").write_text("a,label\n0.5,1\n")
    spec = tmp_path / "mine.yaml"
    body = "name: x\nsource: {{kind: csv, path: {path}, features: [a], label: label}}\nteachers: [{{id: t, kind: mlp_classifier}}]\nstudent: {{kind: mlp}}\nlosses: [{{name: kd}}]\ntracking: {{model_name: m}}\n"
    from kdpipe.cli import main

    for found in ("data/rows.csv", "data/*.csv", "data"):
        spec.write_text(body.format(path=found))
        assert main(["validate", str(spec)]) == 0, found
    for missing in ("rows.csv", "data/*.parquet"):
        spec.write_text(body.format(path=missing))
        assert main(["validate", str(spec)]) == 2
        err = capsys.readouterr().err
        assert "source.path" in err and "not found" in err and str(tmp_path) in err


def test_loss_needs_the_cached_columns_it_reads(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"teachers.0.outputs": ["topk"]})
    assert "losses[0] (kd)" in msg and "use_topk: true" in msg


def test_several_teachers_need_an_explicit_loss_teacher() -> None:
    from kdpipe.config import load_spec

    with pytest.raises(SpecError, match=r"losses\[0\] \(kd\): several teachers .* set `teacher:`"):
        load_spec("pipelines/digits_fusion.yaml", {"losses.0.teacher": None})


def test_baseline_student_params_are_validated(digits_spec_raw) -> None:
    msg = _err(digits_spec_raw, {"evaluate.baseline_student_params": {"hiden": [3]}})
    assert "evaluate.baseline_student_params" in msg and "hiden" in msg


@pytest.mark.parametrize(
    "spec", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "pipelines").glob("*.yaml"))
)
def test_every_shipped_pipeline_spec_validates(spec: str) -> None:
    """Users copy these: each must load, with its teachers, students and losses resolved."""
    cfg = load_spec(Path(__file__).resolve().parent.parent / "pipelines" / spec)
    assert cfg.name == spec.removesuffix(".yaml") and cfg.teachers and cfg.losses


def test_the_plugin_name_index_sees_a_file_added_to_a_running_process() -> None:
    """A notebook or a test session checks a spec, then drops a loss file in: the next check finds it."""
    import uuid

    from kdpipe.plugins import unknown

    name = f"late_loss_{uuid.uuid4().hex[:6]}"
    assert unknown("LOSSES", name, "losses[0].name") is not None  # fills any cache this process keeps
    plugin = ROOT / "kdpipe" / "losses" / f"{name}.py"
    plugin.write_text(f'from kdpipe.losses import LOSSES\n\n\n@LOSSES.register("{name}")\nclass Late:\n    pass\n')
    try:
        assert unknown("LOSSES", name, "losses[0].name") is None
    finally:
        plugin.unlink(missing_ok=True)
    assert unknown("LOSSES", name, "losses[0].name") is not None


def test_a_plugin_file_that_does_not_import_is_named_in_one_line(tmp_path: Path) -> None:
    """A user's new loss file with a typo: `kdpipe validate` names the file and the line, no traceback."""
    import subprocess
    import sys
    import uuid

    name = f"broken_{uuid.uuid4().hex[:6]}"
    plugin = ROOT / "kdpipe" / "losses" / f"{name}.py"
    plugin.write_text(f'from kdpipe.losses import LOSSES\n\n\n@LOSSES.register("{name}")\ndef oops(:\n    pass\n')
    try:
        kdpipe = Path(sys.executable).with_name("kdpipe")
        out = subprocess.run(
            [str(kdpipe), "validate", "pipelines/digits_kd.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    finally:
        plugin.unlink(missing_ok=True)
    assert out.returncode == 1, out.stderr
    assert f"kdpipe.losses.{name}" in out.stderr and "line 5" in out.stderr and "SyntaxError" in out.stderr
    assert "Traceback" not in out.stderr
