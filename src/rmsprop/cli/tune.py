"""``rmsprop tune``: grid / random / Sobol search of lr and decay on Optuna, resumable.

Heavy imports (optuna, torch, matplotlib) happen inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """\
Search an optimizer's learning rate and decay rate on a problem with Optuna: a suite
problem (mlp-digits...) or your own (--problem pkg.module:make_problem).
lr is log-uniform (grid: 5 points per decade); a decay rho (RMSProp alpha, Adam beta2,
SGD momentum) is searched as 1-rho on a log scale (grid: 0.9, 0.95, 0.99, 0.995, 0.999).
The study lives in --storage (default: a local SQLite file) and resumes when the same
command is run again: it ends with exactly --trials completed trials. Several workers:
--jobs K (local processes), --storage journal:PATH (a journal file) or a PostgreSQL URL
(several machines, each running the same command). The best configuration is re-run on
fresh seeds; the report (--out) holds the trial table, heat map, lr sensitivity,
expected best-of-k curve and parameter importances. Ctrl-C re-queues the running trials:
the same command resumes. A password in --storage is never printed."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` parser."""
    p = subparsers.add_parser("tune", help="grid/random/Sobol search of lr and decay (Optuna)",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", required=True,
                   help="suite problem (e.g. mlp-digits) or pkg.module:make_problem (your own)")
    p.add_argument("--optimizer", default="rmsprop",
                   help="optimizer name (rmsprop, adam, sgd...) or module:attr (default rmsprop)")
    p.add_argument("--sampler", default="random", help="grid, random or sobol (default random)")
    p.add_argument("--trials", type=int, default=None,
                   help="completed trials the study must hold (default: the whole grid; 16 for "
                        "random/sobol)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--study", default=None,
                   help="study name (default PROBLEM-OPTIMIZER-SAMPLER); same name = resume")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default sqlite:///rmsprop-tune.db); "
                        "journal:PATH for a journal file; postgresql+psycopg2://... for several "
                        "machines")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--out", default=None, help="report directory (default tune-STUDY)")
    p.add_argument("--objective", default="loss",
                   help="loss (final validation loss, default) or steps (steps to --target)")
    p.add_argument("--target", type=float, default=None,
                   help="validation loss to reach, for --objective steps")
    p.add_argument("--tune", default="", metavar="NAMES",
                   help="extra hyperparameters to search, comma separated (momentum,eps)")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="override a searched range, e.g. --range lr=1e-4:1 (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: problem's)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="training seed of every trial (default 0; confirmation uses the next)")
    p.add_argument("--confirm-seeds", type=int, default=5,
                   help="fresh seeds the best config is re-run on (default 5)")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between worker heartbeats (default 10)")
    p.add_argument("--grace", type=int, default=30,
                   help="seconds without heartbeat before a trial is failed and re-queued")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no-plots", action="store_true",
                   help="report without PNG figures and parameter importances (no "
                        "matplotlib/scipy imports: faster, headless)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check everything, print the study header, run the search, print the result.

    Every user error (options, problem, optimizer, storage, a mismatched resume) is a one-line
    CLIError raised before the header, so a wrong command prints nothing else.
    """
    from rmsprop.cli import CLIError

    try:
        from rmsprop.tools import tuning
    except ImportError as e:  # optuna/tqdm missing
        raise CLIError(f"tune needs the cli extra (pip install 'rmsprop[cli]'): {e}") from None

    try:
        spec = tuning.resolve_optimizer(args.optimizer)
        ranges = [tuning.parse_range(r) for r in args.range]
        space = tuning.build_space(spec, args.tune.split(","), ranges)
        cfg = tuning.TuneConfig(
            problem=args.problem, optimizer=args.optimizer, space=space, sampler=args.sampler,
            trials=args.trials, seed=args.seed, study=args.study,
            storage=args.storage or tuning.DEFAULT_STORAGE, jobs=args.jobs, out=args.out,
            objective=args.objective, target=args.target, steps=args.steps,
            train_seed=args.train_seed, confirm_seeds=args.confirm_seeds,
            heartbeat=args.heartbeat, grace=args.grace, progress=not args.no_progress,
            plots=not args.no_plots)
        if cfg.out is None:
            cfg.out = f"tune-{cfg.study}"
        ready = tuning.prepare(cfg)
        _print_header(cfg)
        result = tuning.run_tune(cfg, log=lambda s: print(s, file=sys.stderr), prepared=ready)
    except tuning.USER_ERRORS as e:
        raise CLIError(str(e)) from None
    _print_result(cfg, result)
    return 0


def _print_header(cfg: Any) -> None:
    from rmsprop.tools.storage import redact
    from rmsprop.tools.tune_report import grid_line

    print(f"study {cfg.study} in {redact(str(cfg.storage))}: {cfg.trials} trials, sampler "
          f"{cfg.sampler} (seed {cfg.seed}), {cfg.jobs} worker(s)")
    print("search space:")
    for p in cfg.space:
        print(f"  {grid_line(p, cfg.sampler)}")
    sys.stdout.flush()


def _print_result(cfg: Any, result: Any) -> None:
    from rmsprop.tools.tune_report import band_line

    hp = ", ".join(f"{k}={v:g}" for k, v in result.best_hp.items())
    print(f"trials: {result.summary['tally']}")
    c = result.confirm
    if c.get("seeds"):
        print(f"best: {hp}  (trial {result.best_trial}: {result.best_value:.5g}; "
              f"fresh seeds {c['seeds'][0]}..{c['seeds'][-1]}: median {c['median']:.5g}, "
              f"mean {c['mean']:.5g} ± {c['std']:.2g}, diverged {c['diverged']})")
        if c.get("beats_runner_up") is False:
            print("note: on fresh seeds the best config does not beat the runner-up's tuning "
                  "value; the top configs are within noise")
    else:
        print(f"best (not re-run): {hp}  (trial {result.best_trial}: {result.best_value:.5g})")
    for e in result.edges:
        print(f"warning: {e}")
    band = band_line(result.summary)
    if band:
        print(band)
    import os

    files = sorted(f for f in os.listdir(cfg.out) if f != "worker-logs")
    print(f"report: {cfg.out}/ ({', '.join(files)})")
