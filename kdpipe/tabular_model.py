"""The `pyfunc` of a student trained on a table's named columns (a "model from code" for MLflow).

MLflow copies this file into the registered model and loads it with the model: it must import
nothing of kdpipe. It serves the student's exported program (`artifacts/model.pt2`, a
`torch.export` archive) on a DataFrame with the feature columns the model's signature names —
MLflow puts them in the signature's order first — and returns one column per class (the class
names when the labels were names). Nothing in it is pickled.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import set_model


class TabularModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        self.program = torch.export.load(context.artifacts["program"]).module()
        self.outputs = list((context.model_config or {}).get("outputs") or [])

    # a DataFrame hint: MLflow reads the schema from the saved signature (the feature columns), not
    # from the hint (with `Any` or no hint it warns on every save)
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        x = torch.from_numpy(np.array(model_input, dtype=np.float32))  # a copy: pandas' arrays may be read-only
        with torch.no_grad():
            out = self.program(x).numpy()
        return pd.DataFrame(out, columns=self.outputs or None)


set_model(TabularModel())
