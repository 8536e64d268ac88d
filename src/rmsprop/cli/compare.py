"""``rmsprop compare``: RMSProp vs Adam vs SGD on the offline suite or on your own problem.

A thin layer over :func:`rmsprop.tools.compare.run` (the protocol, the resume rules and the
report are there): parse the options, run, print the summary table and where the report is.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import CLIError


def register(subparsers: Any) -> None:
    """Add the ``compare`` parser."""
    from rmsprop.tools.compare import SEARCHES, SUITE_DEFAULTS

    p = subparsers.add_parser(
        "compare",
        help="RMSProp vs Adam vs SGD on an offline problem suite or your own (report + plots)",
        description="RMSProp vs Adam vs SGD on an offline problem suite, or on your own problem "
        "(--problem pkg.module:make_problem). Every optimizer runs at its library defaults and "
        "tuned with the same trial budget on the validation split; both are re-run on fresh "
        "seeds with common random numbers. Writes one JSON per run, results.csv, report.md "
        "(a verdict on each claim first) and PNG plots; re-running with the same --out and "
        "options resumes.",
    )
    p.add_argument("--suite", default="quick", choices=list(SUITE_DEFAULTS),
                   help="problem suite (default: quick, a few minutes on 2 cores)")
    p.add_argument("--problem", action="append", default=None, metavar="NAME[,NAME]",
                   help="problems to run instead of the suite's: suite names or your own "
                        "'pkg.module:make_problem' (a function returning a Problem); "
                        "repeatable or comma-separated")
    p.add_argument("--optimizer", action="append", default=None, metavar="NAME[,NAME]",
                   help="optimizers: registered names or 'pkg.module:Class' import paths")
    p.add_argument("--seeds", type=int, default=None,
                   help="fresh seeds for the re-runs (default: quick 3, standard 5, extended 10)")
    p.add_argument("--trials", type=int, default=None,
                   help="tuning trials per optimizer and problem (default: quick 8, standard 10, "
                        "extended 25; 0 = defaults only)")
    p.add_argument("--search", default="sobol", choices=list(SEARCHES),
                   help="tuning sampler: the scrambled Sobol (default) or random sequence of "
                        "`rmsprop tune` (its search space, the same points), a Latin hypercube "
                        "over the same space, or a log grid over the learning rate only; "
                        "except with grid, trial 0 is the library defaults")
    p.add_argument("--schedule", default=None, choices=["constant", "cosine"],
                   help="learning-rate schedule (default: constant; cosine for --suite extended)")
    p.add_argument("--steps", type=int, default=None,
                   help="override every problem's step budget (for smoke runs)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel worker processes (default: number of cores, at most 2)")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new compare-YYYYmmdd-HHMMSS under the working "
                        "directory); an existing one is resumed when the options match")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rmsprop compare``."""
    from rmsprop.tools import compare
    from rmsprop.tools.user_problem import ProblemError

    command = "rmsprop " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    try:
        res = compare.run(args.problem, args.optimizer, suite=args.suite, seeds=args.seeds,
                          trials=args.trials, search=args.search, schedule=args.schedule,
                          steps=args.steps, jobs=args.jobs, out=args.out,
                          plots=not args.no_plots, command=command)
    except (compare.CompareError, ProblemError) as e:  # one line, nothing written
        raise CLIError(str(e)) from None
    except KeyboardInterrupt:
        return 130  # the runner has said where the finished runs are and how to resume
    print(res.table)
    if res.verdicts:
        print("\nverdict: " + "; ".join(f"{k}: {v}" for k, v in res.verdicts.items()))
    print(f"report: {res.report_path}  ({res.elapsed:.0f} s)")
    return 0
