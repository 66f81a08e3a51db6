"""A console a person can read: kdpipe's own lines, and Ray's and MLflow's only when they mean
something for this run.

Done through the libraries' own switches, not by swallowing output: Ray Data's logging config
(`RAY_DATA_LOGGING_CONFIG`: its console handler at WARNING, everything still written to the
session's `ray-data.log`), logger levels for MLflow and friends, transformers' own switch for its
weight-loading bars, and one filter that drops warnings known to be benign here (`BENIGN`).
`-v` keeps everything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

BENIGN = (
    "Token authentication is enabled for this Ray cluster",  # the embedded cluster listens on 127.0.0.1 only
    "Progress bars disabled",  # kdpipe's own choice outside a terminal (CI logs)
    # printed when a dataset starts while actors of the previous stage are still being torn down; the one
    # real case (teacher actors holding every CPU) kdpipe detects and explains itself (kdpipe.teach)
    "Warning: The Ray cluster currently does not have any available CPUs",
)
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


class DropBenign(logging.Filter):
    """Drops the records in `BENIGN`; used by the Ray Data config (in every worker) and on Ray's handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(b) for b in BENIGN)


def configure(verbose: bool) -> None:
    """Call once, first thing in the CLI (before Ray or Ray Data are imported)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if verbose:
        os.environ.setdefault("KDPIPE_RAY_LOGS", "1")  # worker output to the console too
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    # imported first: Ray installs its handler on the "ray" logger (which the filter joins) and
    # MLflow sets its own logger level on import (which ours must come after)
    import mlflow  # noqa: F401
    import ray  # noqa: F401

    for name in ("ray", "mlflow", "alembic", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights: 100%" for every student built from a teacher
    for handler in logging.getLogger("ray").handlers:
        handler.addFilter(DropBenign())
