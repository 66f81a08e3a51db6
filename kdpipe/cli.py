"""The `kdpipe` command.

A spec is read and its shape checked before anything heavy is imported (`kdpipe.spec` needs only
pydantic and YAML), so a typo is reported in a fraction of a second; the commands' own modules —
torch, Ray, MLflow, transformers — are imported by the dispatch below, after that check. This is
the one place in kdpipe where imports live inside functions.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

from kdpipe.errors import KdpipeError, SpecError
from kdpipe.spec import PipelineConfig, check_source_found, parse_override, read_spec

HELP_TEXT = {
    "spec": "pipeline spec YAML, e.g. pipelines/digits_kd.yaml (data paths in it are relative to its folder)",
    "set": "override a spec key, e.g. --set train.epochs=5 (repeatable; the value is read as YAML)",
    "address": "Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)",
    "tracking_uri": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db)",
}


def _spec_args(p: argparse.ArgumentParser, address: bool = True) -> None:
    p.add_argument("spec", help=HELP_TEXT["spec"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=HELP_TEXT["set"])
    if address:
        p.add_argument("--address", default=None, help=HELP_TEXT["address"])


def read(args: argparse.Namespace) -> PipelineConfig:
    """The spec's schema and plugin names: fast, no heavy import (see the module docstring)."""
    overrides = dict(parse_override(o) for o in args.overrides)
    spec = read_spec(args.spec, overrides)
    if args.cmd != "submit":  # a submitted spec's data may be at a path only the cluster has
        check_source_found(spec, origin=args.spec)
    return spec


def checked(spec: PipelineConfig, args: argparse.Namespace) -> PipelineConfig:
    """The spec checked against the plugins (their params, what each loss reads): imports torch and
    the plugin modules, not Ray or MLflow, so these errors too come before the heavy start-up."""
    from kdpipe.config import check_spec

    return check_spec(spec, origin=args.spec)


# ------------------------------------------------------------------ commands


def cmd_validate(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    teachers = ", ".join(f"{t.id} ({t.kind})" for t in cfg.teachers)
    losses = " + ".join(f"{l.weight:g}·{l.name}" for l in cfg.losses)
    print(
        f"{args.spec}: valid. {cfg.name}: teachers {teachers} -> student {cfg.student.kind} with {losses}; "
        f"storage {cfg.storage}"
    )
    return 0


def cmd_run(args: argparse.Namespace, spec: PipelineConfig) -> int:
    from kdpipe.pipeline import run

    res = run(spec, address=args.address)
    _print_result(res)
    return 0


def _print_result(res: Any) -> None:
    for tid, t in res.teach.items():
        state = "reused" if t.reused else f"taught {t.rows_taught} rows"
        print(f"cache[{tid}]: {t.cache.dir} ({state}, fingerprint {t.fingerprint})")
    print(
        f"MLflow run: {res.run_id}  (tracking URI {res.tracking_uri}; browse with `mlflow ui --backend-store-uri {res.tracking_uri}`)"
    )
    print(
        f"registered model: models:/{res.model_name}/{res.model_version}  "
        f"{'promoted to alias' if res.promoted else 'NOT promoted'}: {res.gate_reasons}"
    )
    print()
    print(res.table)


def cmd_teach(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from kdpipe.pipeline import prepare, teach

    source, _ = prepare(cfg, args.address)
    for tid, r in teach(cfg, source).items():
        m = r.manifest()
        print(
            f"cache[{tid}]: {r.cache.dir} rows={m.get('rows')} parts={len(m.get('parts', []))} "
            f"{'reused' if r.reused else f'taught {r.rows_taught} new rows'}"
        )
    return 0


def cmd_distil(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from kdpipe.pipeline import distil, locate_caches, prepare

    source, uri = prepare(cfg, args.address)
    res = distil(cfg, source, locate_caches(cfg, source), uri)
    _print_result(res)
    return 0


def cmd_eval(args: argparse.Namespace, spec: PipelineConfig) -> int:
    from kdpipe.ops import evaluate_registered

    for k, v in evaluate_registered(spec, args.alias, args.address).items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def cmd_promote(args: argparse.Namespace, spec: None) -> int:
    from kdpipe.ops import promote_version

    print(promote_version(args.name, args.version, args.alias, args.tracking_uri, force=args.force))
    return 0


def cmd_models(args: argparse.Namespace, spec: None) -> int:
    from kdpipe.ops import list_models

    print(list_models(args.name, args.tracking_uri))
    return 0


def cmd_retrain(args: argparse.Namespace, spec: PipelineConfig) -> int:
    from kdpipe.ops import retrain

    res = retrain(spec, address=args.address, force=args.force, warm_start=args.warm_start)
    if res.skipped:
        print(f"retrain: skipped: {res.reason}")
    else:
        _print_result(res.run)
    return 0


def cmd_schedule(args: argparse.Namespace, spec: PipelineConfig) -> int:
    from kdpipe.ops import build_scheduler

    overrides = dict(parse_override(o) for o in args.overrides)
    sched = build_scheduler(args.spec, args.cron, overrides, args.address, args.warm_start, args.timezone)
    print(
        f"kdpipe schedule: retrain cycles of {args.spec} on '{args.cron}' ({args.timezone}); Ctrl-C stops", flush=True
    )
    try:
        sched.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


def cmd_submit(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from kdpipe.ops import submit

    job_id, status = submit(
        args.spec,
        args.address,
        args.overrides,
        follow=not args.no_follow,
        cfg=cfg,
        command=args.command,
        verbose=args.verbose,
    )
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" or args.no_follow else 1


def cmd_compare(args: argparse.Namespace, spec: PipelineConfig) -> int:
    import json

    from kdpipe.compare import compare

    overrides = dict(parse_override(o) for o in args.overrides)
    table, results = compare(args.spec, args.seeds, overrides, address=args.address)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def cmd_plugins(args: argparse.Namespace, spec: None) -> int:
    from kdpipe.plugins import describe_registered

    print(describe_registered())
    return 0


def cmd_cache(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from kdpipe.cache_ops import repair_caches, verify_caches

    if args.action == "verify":
        report = verify_caches(cfg, address=args.address)
        print(report.text())
        return 0 if report.ok else 1
    print(repair_caches(cfg, address=args.address).text())
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kdpipe", description="Knowledge distillation on Ray: teach -> cache -> distil -> track."
    )
    ap.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and Ray's worker output and native messages on the console",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(
        name: str, fn: Callable[..., int], help: str, spec: bool = True, address: bool = True, local: bool = False
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if spec:
            _spec_args(p, address)
        p.set_defaults(fn=fn, needs_spec=spec, local=local)  # local: touches neither Ray nor MLflow
        return p

    add(
        "validate",
        cmd_validate,
        "check a spec (schema, plugins and their params) without running anything",
        address=False,
        local=True,
    )
    add("run", cmd_run, "teach (reusing caches), distil, evaluate, register, gate and promote")
    add("teach", cmd_teach, "run the teachers over the source and fill the Parquet cache")
    add("distil", cmd_distil, "train the student from an existing cache, evaluate, register")
    p = add("eval", cmd_eval, "evaluate the registered model at an alias on the held-out test split")
    p.add_argument("--alias", default=None, help="alias to evaluate (default: the spec's tracking.alias)")
    p = add("retrain", cmd_retrain, "one retraining cycle: new rows only, challenger vs champion, one cycle at a time")
    p.add_argument("--force", action="store_true", help="train even when no new source data arrived")
    p.add_argument("--warm-start", action="store_true", help="initialise the challenger from the champion's weights")
    p = add("schedule", cmd_schedule, "run retrain cycles on a cron schedule in this process (APScheduler)")
    p.add_argument("--cron", required=True, help='5-field crontab expression, e.g. "0 3 * * *"')
    p.add_argument(
        "--timezone", default="UTC", help="time zone of the cron expression (an IANA name, e.g. Europe/Paris)"
    )
    p.add_argument("--warm-start", action="store_true", help="initialise each challenger from the champion's weights")
    p = add(
        "submit",
        cmd_submit,
        "submit a kdpipe command for SPEC to a Ray cluster as a Ray job and follow its log",
        address=False,
    )
    p.add_argument(
        "--address",
        required=True,
        help="the cluster's Ray dashboard (Jobs API), e.g. http://127.0.0.1:8265 through a port-forward",
    )
    p.add_argument(
        "--command", default="run", choices=["run", "teach", "retrain"], help="what the job runs (default: run)"
    )
    p.add_argument("--no-follow", action="store_true", help="print the job id and return without waiting")
    p = add("compare", cmd_compare, "a method vs its baselines over several seeds (mean ± std), logged to MLflow")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    p.add_argument("--out", default=None, help="write the per-seed results as JSON here")
    p = add("cache", cmd_cache, "check the spec's teacher caches against their checksums, or repair them", spec=False)
    p.add_argument(
        "action",
        choices=["verify", "repair"],
        help="verify: read every part and check it; repair: drop damaged or unreferenced parts, rebuild a "
        "lost manifest from verified parts, and teach again only the rows they held",
    )
    _spec_args(p)
    p.set_defaults(needs_spec=True)
    p = add(
        "promote",
        cmd_promote,
        "point an alias at a registered model version (refuses a version that failed its gates unless --force)",
        spec=False,
    )
    p.add_argument("name", help="the registered model's name")
    p.add_argument("version", help="the version to promote")
    p.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    p.add_argument("--force", action="store_true", help="promote even a version whose gates failed")
    p.add_argument("--tracking-uri", default=None, help=HELP_TEXT["tracking_uri"])
    add(
        "plugins",
        cmd_plugins,
        "list the teacher kinds, students, losses and evaluators a spec can name",
        spec=False,
        local=True,
    )
    p = add("models", cmd_models, "list registered versions with their metrics, gates and aliases", spec=False)
    p.add_argument("name", help="the registered model's name")
    p.add_argument("--tracking-uri", default=None, help=HELP_TEXT["tracking_uri"])
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def _one_line(e: BaseException, verbose: bool) -> int:
    """A user error as one line (exit 1); `-v` adds the traceback."""
    if verbose:
        import traceback

        traceback.print_exception(e)
    where = f" ({e.filename})" if isinstance(e, FileNotFoundError) and e.filename else ""
    print(f"kdpipe: error: {e}{where}", file=sys.stderr)
    return 1


def run_command(args: argparse.Namespace) -> int:
    try:
        spec = read(args) if args.needs_spec else None  # before any heavy import: a typo costs no start-up
        # then against the plugins (torch, the plugin modules), still before Ray, MLflow and the console set-up
        spec = checked(spec, args) if spec is not None else None
    except SpecError as e:
        print(f"kdpipe: spec error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # a plugin file that does not import (kdpipe.registry.PluginImportError)
        return _one_line(e, args.verbose)
    if args.local:
        try:
            return int(args.fn(args, spec) or 0)
        except ImportError as e:
            return _one_line(e, args.verbose)
    from kdpipe.runtime import embedded_loopback, no_phone_home

    no_phone_home(os.environ)
    embedded_loopback(os.environ, getattr(args, "address", None))  # before Ray is imported
    from kdpipe.console import configure

    configure(args.verbose)
    from mlflow.exceptions import MlflowException

    from kdpipe.runtime import ray_is_up, stop_local_ray

    started_here = not ray_is_up()
    try:
        return int(args.fn(args, spec) or 0)
    except SpecError as e:
        print(f"kdpipe: spec error: {e}", file=sys.stderr)
        return 2
    except (KdpipeError, FileNotFoundError, TimeoutError, MlflowException) as e:
        return _one_line(e, args.verbose)
    finally:
        if started_here and not args.verbose:  # with -v, Ray's exit hook stops it after the workers' last lines
            stop_local_ray()


def entry() -> None:
    """The `kdpipe` console command: the command with native stderr filtered (unless `-v`: Ray's
    one benign C++ ERROR line per run stays off the console, `kdpipe.stderr_filter`), then exit
    without the interpreter's final garbage collection, which after a run walks every object torch,
    Ray, MLflow and transformers created (`bench/exit_cost.py` measures it): `gc.freeze()` puts
    them out of its reach; exit hooks still run. In-process callers of `main` (tests) keep their
    GC and their stderr."""
    from kdpipe.stderr_filter import NativeStderrFilter

    args = build_parser().parse_args()
    native = NativeStderrFilter()
    if not args.verbose and args.cmd != "validate":
        native.start()
    try:
        rc = run_command(args)
    except BrokenPipeError:  # `kdpipe plugins | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 0
    finally:
        native.stop()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
