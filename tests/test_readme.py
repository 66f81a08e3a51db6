"""The README is a front door that works: short, in the project's own voice, and its own-data
example runs as written — `kdpipe validate` then `kdpipe run` on a user's wide CSV with an id
column, class names and most labels missing — and ships a model that takes a DataFrame."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def example_spec() -> str:
    block = README.split("<!-- example: own-table -->", 1)[1]
    return re.search(r"```yaml\n(.*?)```", block, re.S).group(1)  # type: ignore[union-attr]


def readings_csv(path: Path, labeled: float = 0.2) -> object:
    """The example's table: scikit-learn's real digits as 20 feature columns, an id, a class name."""
    import pandas as pd
    from sklearn.datasets import load_digits

    d = load_digits()
    cols = np.linspace(0, 63, 20).astype(int)
    df = pd.DataFrame(d.data[:, cols] / 16.0, columns=[f"f_{i:02d}" for i in range(20)])
    df.insert(0, "reading_id", [f"r{i:05d}" for i in range(len(df))])
    names = ["idle", "low", "medium", "high", "peak", "cooling", "fault", "restart", "calibrating", "off"]
    keep = np.random.default_rng(0).random(len(df)) < labeled
    df["state"] = [names[t] if k else None for t, k in zip(d.target, keep)]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df


def test_the_readme_is_short_and_speaks_of_the_project_only() -> None:
    assert len(README.splitlines()) <= 250
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks: YAML comments, commands
        hits = re.findall(r"(?<![\w`-])(I|I'm|I've|we|We|our|Our|us)(?![\w`'-])", text)
        assert not hits, f"{page.relative_to(ROOT)}: first person {sorted(set(hits))}"


def test_the_own_data_example_runs_as_written(ray_local, tmp_path: Path, monkeypatch, capsys) -> None:
    import mlflow
    import mlflow.pyfunc

    from kdpipe.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "my_pipeline.yaml").write_text(example_spec())
    frame = readings_csv(tmp_path / "data" / "readings.csv")
    assert main(["validate", "my_pipeline.yaml"]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["run", "my_pipeline.yaml"]) == 0
    out = capsys.readouterr().out
    assert "registered model: models:/my-student/1" in out and "promoted" in out
    assert (tmp_path / ".kdpipe" / "cache").is_dir() and (tmp_path / ".kdpipe" / "teachers").is_dir()

    # the registered model takes a DataFrame of the feature columns, by name, and answers in classes
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    model = mlflow.pyfunc.load_model("models:/my-student@champion")
    columns = [f"f_{i:02d}" for i in range(20)]
    assert [c.name for c in model.metadata.get_input_schema().inputs] == columns
    answers = model.predict(frame[list(reversed(columns))].head(200))  # columns in any order
    assert sorted(answers.columns) == sorted(frame["state"].dropna().unique())
    truth = frame["state"].head(200).dropna()
    assert (answers.idxmax(axis=1)[truth.index] == truth).mean() > 0.5


@pytest.mark.parametrize("key", ["teach.cache_root", "train.storage_path"])
def test_moved_keys_say_where_they_went(tmp_path: Path, key: str) -> None:
    from kdpipe.errors import SpecError
    from kdpipe.spec import read_spec

    (tmp_path / "s.yaml").write_text(example_spec())
    with pytest.raises(SpecError, match="storage:"):
        read_spec(tmp_path / "s.yaml", {key: "/somewhere"})
