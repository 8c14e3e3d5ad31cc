"""The `das` command line. Each subcommand is a thin wrapper over one job module."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from . import __version__
from .errors import StoreError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
# Operating-system errors that are the machine's state, not a bug: one line, with the fix.
USER_OS_ERRORS = {
    errno.ENOSPC: "free disk space or point [store] path at a larger disk",
    errno.EDQUOT: "free space within your quota or use another disk",
    errno.EROFS: "the file system is read-only: point [store] path at a writable disk",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EMFILE: "raise the open-files limit (ulimit -n)",
}


ENSEMBLE_COMMANDS = ("extract", "reduce", "score", "run", "status", "verify", "report")
"""Commands that work with an ensemble ([[model]] list); the others refuse it in one line."""


def _config(path, command: str | None = None):
    """Load the config; ``command``: refuse an ensemble unless it is in ENSEMBLE_COMMANDS."""
    from .config import load_config
    from .ensemble import refuse_ensemble

    cfg = load_config(path)
    if command is not None and command not in ENSEMBLE_COMMANDS:
        refuse_ensemble(cfg, command)
    return cfg


def _device(name: str) -> str:
    """The torch device of ``--device`` for reduce and score, checked before any work."""
    import torch

    from .errors import ConfigError

    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is visible to torch here; use "
                              f"--device cpu (the default)")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                              f"CUDA devices (cuda:0 ..); choose one of them")
        return name
    raise ConfigError(f"--device {name!r}: choose cpu, cuda or cuda:N")


def cmd_extract(args) -> int:
    from .extract import run_extract

    cfg = _config(args.config)
    if cfg.is_ensemble:
        from .ensemble import run_extract_ensemble

        for s in run_extract_ensemble(cfg, args.split or None, show_progress=not args.quiet,
                                      partial_gram=args.partial_gram,
                                      replace=args.replace_split or None,
                                      replace_members=args.replace_member or None):
            print(f"extract: member {s['member']}: rank {s['rank']}/{s['world']} wrote "
                  f"{s['units']} units ({s['samples']} samples) in {s['seconds']:.1f} s -> "
                  f"{s['store']}")
        return 0
    if args.replace_member:
        from .errors import ConfigError

        raise ConfigError(f"--replace-member {args.replace_member[0]}: [model] is a single "
                          f"table, not an ensemble ([[model]] list); use --replace-split")
    summary = run_extract(cfg, args.split or None,
                          show_progress=not args.quiet, partial_gram=args.partial_gram,
                          replace=args.replace_split or None)
    print(f"extract: rank {summary['rank']}/{summary['world']} wrote {summary['units']} units "
          f"({summary['samples']} samples, {summary['attributed_params']} attributed parameters) "
          f"in {summary['seconds']:.1f} s -> {summary['store']}"
          + (f"; partial Grams: {', '.join(summary['partials'])}" if summary["partials"] else ""))
    return 0


def cmd_reduce(args) -> int:
    from .reduce import run_reduce

    cfg = _config(args.config)
    kwargs = dict(show_progress=not args.quiet, device=_device(args.device),
                  partials=args.partials, force=args.force)
    if cfg.is_ensemble:
        from .ensemble import run_reduce_ensemble

        results = {f"member {i}: ": r for i, r in enumerate(run_reduce_ensemble(cfg, **kwargs))}
    else:
        results = {"": run_reduce(cfg, **kwargs)}
    for who, readout, s in ((w, r, s) for w, res in results.items() for r, s in res.items()):
        if s["reused"]:
            print(f"reduce: {who}{readout}: reused the stored factor (train features and settings "
                  f"unchanged; trace {s['trace']:.4g}); --force recomputes it")
            continue
        print(f"reduce: {who}{readout}: trace {s['trace']:.4g}, numerical rank {s['rank']}, "
              f"{s['seconds']:.1f} s ({s['source']}; {s['factor']})")
    return 0


def cmd_score(args) -> int:
    from .score import run_score

    cfg = _config(args.config)
    score = run_score
    if cfg.is_ensemble:
        from .ensemble import run_score_ensemble as score
    for name, s in score(cfg, args.query_set or None, show_progress=not args.quiet,
                         device=_device(args.device)).items():
        members = f" (mean of {s['members']} members)" if "members" in s else ""
        print(f"score: {name}: {s['queries']} queries{members} in {s['seconds']:.1f} s; top-k: "
              f"{', '.join(s['csv'])}")
    return 0


def cmd_report(args) -> int:
    from .report import run_report

    r = run_report(_config(args.config), args.query_set or None, args.method or None,
                   Path(args.out) if args.out else None,
                   lds=Path(args.lds) if args.lds else None)
    print(f"report: {len(r['pages'])} pages in {r['seconds']:.1f} s -> {r['index']}")
    return 0


def cmd_attribute(args) -> int:
    import json

    from .attribute import answer, run_attribute

    result, page, seconds = run_attribute(_config(args.config, "attribute"), [Path(p) for p in args.image],
                                          args.prompt, args.topk)
    if args.json:
        print(json.dumps(answer(result)))
        return 0
    for query in result["queries"]:
        print(f"attribute: {query['image']}")
        for m, entries in query["methods"].items():
            print(f"  {m:<10} " + "  ".join(f"{e['rank']}. {e['train_uid']} ({e['score']:.4g})"
                                           for e in entries))
    print(f"attribute: {len(result['queries'])} image(s) in {seconds:.1f} s -> {page}")
    return 0


def cmd_serve(args) -> int:
    from .serve import run_serve

    run_serve(_config(args.config, "serve"), args.host, args.port)
    return 0


def cmd_run(args) -> int:
    for step in (cmd_extract, cmd_reduce, cmd_score, cmd_report):
        step(args)
    return 0


def cmd_status(args) -> int:
    from .launch.status import status_lines

    cfg = _config(args.config)
    if cfg.is_ensemble:
        from .ensemble import status_lines_ensemble as status_lines
    print("\n".join(status_lines(cfg, args.stale_after)))
    return 0


def cmd_submit(args) -> int:
    from .launch.slurm import submit

    submit(args)
    return 0


def cmd_verify(args) -> int:
    from .fingerprint import open_store
    from .storecheck import verify_store

    cfg = _config(args.config)
    if cfg.is_ensemble:  # every member's store, each checked against its own fingerprint
        from .ensemble import check_existing_members, member_dir

        check_existing_members(cfg)
        unresolved = False
        for i in range(len(cfg.members)):
            report = verify_store(member_dir(cfg.store.path, i), fix=args.fix)
            print("\n".join([f"member {i} ({cfg.members[i].path}):",
                             *("  " + line for line in report.lines())]))
            unresolved |= bool(report.unresolved)
        return 1 if unresolved else 0
    root = Path(cfg.store.path) / "zarr.json"
    if root.exists():
        try:
            open_store(cfg)  # refuses another fingerprint, like every stage
        except StoreError as err:
            if "fingerprint" in str(err) or "other result-affecting" in str(err):
                raise
    report = verify_store(cfg.store.path, fix=args.fix)
    print("\n".join(report.lines()))
    return 1 if report.unresolved else 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), show_progress=not args.quiet)
    return 0


def cmd_doctor(args) -> int:
    from .kernels.doctor import report

    lines, ok = report(quick=args.quick)
    print("\n".join(lines))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="das", description=(
        "Training-data attribution for diffusion models: DAS, D-TRAK and TRAK on a zarr store."))
    parser.add_argument("--version", action="version", version=f"das-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_, config=True):
        p = sub.add_parser(name, help=help_, description=help_)
        if config:
            p.add_argument("config", help="TOML config file")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = add("extract", cmd_extract, "compute projected per-sample features into the store "
            "(resumes; runs under accelerate launch / torchrun as one rank each)")
    p.add_argument("--split", action="append", help="only this split (repeatable)")
    p.add_argument("--replace-split", action="append", metavar="NAME",
                   help="first delete this split's stored features (and, for train, the reductions "
                   "and scores) because its data changed; then extract it again (repeatable)")
    p.add_argument("--replace-member", action="append", type=int, metavar="I",
                   help="ensembles: first delete member I's features (its model changed), then "
                   "extract it again; the other members are kept (repeatable)")
    p.add_argument("--partial-gram", action="store_true",
                   help="then store the partial Gram of this rank's train units for `das reduce` "
                   "(skipped when N < k)")
    p = add("reduce", cmd_reduce, "Gram, eigendecomposition per readout (needs a complete train "
            "split)")
    p.add_argument("--partials", choices=("auto", "require", "ignore"), default="auto",
                   help="sum the ranks' partial Grams when N >= k and they cover every unit "
                   "exactly once (auto, default: else stream the store), insist on them "
                   "(require), or always stream (ignore)")
    p.add_argument("--force", action="store_true",
                   help="recompute factors even when the stored ones are current")
    p.add_argument("--device", default="cpu", help="where the float64 Gram and eigendecomposition runs: cpu "
                   "(default), cuda or cuda:N")
    p = add("score", cmd_score, "score query sets against the training set; writes top-k CSVs")
    p.add_argument("--query-set", action="append", help="only this query set (repeatable)")
    p.add_argument("--device", default="cpu", help="where the float64 solve and scoring runs: cpu "
                   "(default), cuda or cuda:N")
    p = add("report", cmd_report, "write the HTML report of a scored run (pages of 50 queries, "
            "each beside its top-k per method, with PNG contact sheets)")
    p.add_argument("--query-set", action="append", help="only this query set (repeatable)")
    p.add_argument("--method", action="append", help="only this method (repeatable)")
    p.add_argument("--out", help="output folder (default: the store's reports folder)")
    p.add_argument("--lds", help="a `das lds eval --json` file whose LDS the report shows "
                   "(default: <reports>/lds.json when present)")
    p = add("attribute", cmd_attribute, "top-k training images of new image files against the "
            "reduced store (no config edit); prints them and writes a page into the reports folder")
    p.add_argument("image", nargs="+", help="PNG/JPEG image files")
    p.add_argument("--prompt", help="the images' prompt (text-conditioned models)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON only")
    p.add_argument("--topk", type=int, help="entries per method (default: [score] topk)")
    p = add("serve", cmd_serve, "a local page and JSON API (POST /api/attribute) that attribute "
            "uploaded images; model and factors stay loaded")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: "
                   "this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p = add("run", cmd_run, "extract, reduce, score and write the report")
    p.add_argument("--force", action="store_true",
                   help="recompute the reduce even when the stored factors are current")
    p.add_argument("--device", default="cpu", help="where the float64 reduce and scoring runs: cpu "
                   "(default), cuda or cuda:N")
    p.set_defaults(split=None, query_set=None, partial_gram=False, partials="auto",
                   replace_split=None, replace_member=None, method=None, out=None, lds=None)
    p = add("status", cmd_status, "units done per split, rate, ETA, stale units")
    p.add_argument("--stale-after", type=float, default=1800.0,
                   help="seconds after which an unmarked claim counts as stale (default 1800)")
    p = add("submit", cmd_submit, "render and submit Slurm jobs: an extraction job array, then "
            "reduce + score after it (afterok)")
    from .launch.slurm import add_submit_arguments

    add_submit_arguments(p)
    p = add("verify", cmd_verify, "re-read every marked unit and check it against its marker")
    p.add_argument("--fix", action="store_true", help="unmark corrupt units so extract redoes them")
    p = add("demo", cmd_demo, "train a tiny DDPM on digits (cached), attribute generated images, "
            "write a picture", config=False)
    p.add_argument("--out", default="das-demo", help="output folder (default ./das-demo)")
    p = add("doctor", cmd_doctor, "which projection backends work on this machine (CUDA, Triton, "
            "sjlt CPU kernel, fast-jl), each self-tested against the reference", config=False)
    p.add_argument("--quick", action="store_true", help="report availability only, no self-tests")
    from .eval.cli import register_lds

    register_lds(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .dist import PREEMPT_EXIT_CODE, Preempted
    from .errors import DasError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DasError as err:  # a user error; anything else is a bug and keeps its traceback
        print(f"das {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as err:
        print(f"das {args.command}: preempted: {err}", file=sys.stderr)
        return PREEMPT_EXIT_CODE
    except KeyboardInterrupt:
        print(f"das {args.command}: interrupted; what was marked is kept, rerun to continue",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"das {args.command}: error: {os.strerror(err.errno)}{where}: "
              f"{USER_OS_ERRORS[err.errno]}; what was marked is kept, rerun when fixed",
              file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

