"""`kdpipe run | teach | distil | eval | promote | models | submit | retrain | schedule`."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from kdpipe.config import SpecError, load_spec, parse_override


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="pipeline spec YAML, e.g. pipelines/digits_kd.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or an embedded local Ray)")


def _load(args: argparse.Namespace) -> Any:
    overrides = dict(parse_override(o) for o in args.overrides)
    return load_spec(args.spec, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from kdpipe.pipeline import run

    cfg = _load(args)
    res = run(cfg, address=args.address)
    _print_result(res)
    return 0


def _print_result(res: Any) -> None:
    for tid, t in res.teach.items():
        state = "reused" if t.reused else f"taught {t.rows_taught} rows"
        print(f"cache[{tid}]: {t.cache.dir} ({state}, fingerprint {t.fingerprint})")
    print(f"MLflow run: {res.run_id}  (tracking URI {res.tracking_uri}; browse with `mlflow ui --backend-store-uri {res.tracking_uri}`)")
    print(f"registered model: models:/{res.model_name}/{res.model_version}  "
          f"{'promoted to alias' if res.promoted else 'NOT promoted'}: {res.gate_reasons}")
    print()
    print(res.table)


def cmd_teach(args: argparse.Namespace) -> int:
    from kdpipe.pipeline import prepare, teach

    cfg = _load(args)
    source, _ = prepare(cfg, args.address)
    for tid, r in teach(cfg, source).items():
        m = r.manifest()
        print(f"cache[{tid}]: {r.cache.dir} rows={m.get('rows')} parts={len(m.get('parts', []))} "
              f"{'reused' if r.reused else f'taught {r.rows_taught} new rows'}")
    return 0


def cmd_distil(args: argparse.Namespace) -> int:
    from kdpipe.pipeline import distil, locate_caches, prepare

    cfg = _load(args)
    source, uri = prepare(cfg, args.address)
    res = distil(cfg, source, locate_caches(cfg, source), uri)
    _print_result(res)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kdpipe.ops import evaluate_registered

    cfg = _load(args)
    for k, v in evaluate_registered(cfg, args.alias, args.address).items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from kdpipe.model_registry import promote
    from kdpipe.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    promote(MlflowClient(uri), args.name, args.version, args.alias)
    print(f"{args.name}: alias '{args.alias}' -> version {args.version}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kdpipe.ops import list_models

    print(list_models(args.name, args.tracking_uri))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from kdpipe.ops import retrain

    res = retrain(_load(args), address=args.address, force=args.force, warm_start=args.warm_start)
    if res.skipped:
        print(f"retrain: skipped: {res.reason}")
    else:
        _print_result(res.run)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from kdpipe.ops import build_scheduler

    overrides = dict(parse_override(o) for o in args.overrides)
    sched = build_scheduler(args.spec, args.cron, overrides, args.address, args.warm_start, args.timezone)
    print(f"kdpipe schedule: retrain cycles of {args.spec} on '{args.cron}' ({args.timezone}); Ctrl-C stops", flush=True)
    try:
        sched.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from kdpipe.ops import submit

    load_spec(args.spec, dict(parse_override(o) for o in args.overrides))  # validate locally first
    job_id, status = submit(args.spec, args.address, args.overrides, follow=not args.no_follow)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" or args.no_follow else 1


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from kdpipe.compare import compare

    overrides = dict(parse_override(o) for o in args.overrides)
    table, results = compare(args.spec, args.seeds, overrides, address=args.address)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kdpipe", description="Knowledge distillation on Ray: teach -> cache -> distil -> track.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="teach (reusing caches), distil, evaluate, register, gate and promote")
    _spec_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("teach", help="run the teachers over the source and fill the Parquet cache")
    _spec_args(p)
    p.set_defaults(fn=cmd_teach)
    p = sub.add_parser("distil", help="train the student from an existing cache, evaluate, register")
    _spec_args(p)
    p.set_defaults(fn=cmd_distil)
    p = sub.add_parser("eval", help="evaluate the registered model at an alias on the held-out test split")
    _spec_args(p)
    p.add_argument("--alias", default=None, help="alias to evaluate (default: the spec's tracking.alias)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("retrain", help="one idempotent retraining cycle: new rows only, challenger vs champion")
    _spec_args(p)
    p.add_argument("--force", action="store_true", help="train even when no new source data arrived")
    p.add_argument("--warm-start", action="store_true", help="initialise the challenger from the champion's weights")
    p.set_defaults(fn=cmd_retrain)
    p = sub.add_parser("schedule", help="run retrain cycles on a cron schedule in this process (APScheduler)")
    _spec_args(p)
    p.add_argument("--cron", required=True, help='5-field crontab expression, e.g. "0 3 * * *"')
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--warm-start", action="store_true")
    p.set_defaults(fn=cmd_schedule)
    p = sub.add_parser("submit", help="submit `kdpipe run SPEC` to a Ray cluster as a Ray job and follow it")
    p.add_argument("spec")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return")
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("compare", help="a method vs its baselines over several seeds (mean ± std), logged to MLflow")
    _spec_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="write the per-seed results as JSON here")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("promote", help="point an alias at a registered model version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(fn=cmd_promote)
    p = sub.add_parser("models", help="list registered versions with their metrics and aliases")
    p.add_argument("name")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(fn=cmd_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    from kdpipe.console import configure

    configure(args.verbose)
    from mlflow.exceptions import MlflowException

    from kdpipe.config import KdpipeError
    from kdpipe.runtime import ray_is_up, stop_local_ray

    started_here = not ray_is_up()
    try:
        return int(args.fn(args) or 0)
    except SpecError as e:
        print(f"kdpipe: spec error: {e}", file=sys.stderr)
        return 2
    except (KdpipeError, FileNotFoundError, TimeoutError, MlflowException) as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        where = f" ({e.filename})" if isinstance(e, FileNotFoundError) and e.filename else ""
        print(f"kdpipe: error: {e}{where}", file=sys.stderr)
        return 1
    finally:
        if started_here and not args.verbose:  # with -v, Ray's exit hook stops it after the workers' last lines
            stop_local_ray()


def entry() -> None:
    """The `kdpipe` console command: the command with native stderr filtered (unless `-v`: Ray's
    one benign C++ ERROR line per run stays off the console, `kdpipe.stderr_filter`), then exit
    without the interpreter's final garbage collection. After a run that collection walks every
    object torch, Ray, MLflow and transformers created: the demo's exit took 2.97 s with it,
    0.27 s without (`bench/exit_cost.py`), time spent freeing memory the exit frees anyway.
    `gc.freeze()` puts them out of its reach; exit hooks still run, and Python never promised
    `__del__` for objects alive at exit. In-process callers of `main` (tests) keep their GC and
    their stderr."""
    from kdpipe.stderr_filter import NativeStderrFilter

    args = build_parser().parse_args()
    native = NativeStderrFilter()
    if not args.verbose:
        native.start()
    try:
        rc = run_command(args)
    finally:
        native.stop()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
