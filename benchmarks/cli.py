"""``aqcf-bench FAMILY [options]``: run one op family's benchmark and write its table, JSON and plot.

Each family is a module with ``add_arguments(parser)`` and ``main(args) -> int``; register new
ones (``model``) in :data:`FAMILIES`. ``main`` runs in a tuning cache of its own
(:func:`common.fresh_tuning_cache`), removed when it ends.

Examples::

    aqcf-bench conv --grid quick --out /tmp/bq
    aqcf-bench conv --grid targets --check-targets --reps 11
    aqcf-bench conv --grid full --modes fwdbwd --providers expanded,auto
    aqcf-bench rnn --grid targets --check-targets
    python -m benchmarks.cli conv --list --grid full
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from aqcf_kernels._help import plain_text

from . import common

# family -> (module, relative to this package: installed as ``aqcf_bench``, ``benchmarks`` in a source tree;
# one-line help).
FAMILIES: dict[str, tuple[str, str]] = {
    "conv": (".conv", "quaternion convolutions 1d/2d/3d vs naive16 and expanded-weight baselines"),
    "attention": (".attention", "the A-QCF block vs materialised and SDPA-composed blocks, 256-16384 tokens"),
    "model": (".model", "A-QCF-Net training step: ours vs expanded-weight convs vs the real-valued twin"),
    "rnn": (".rnn", "quaternion LiGRU/LSTM stacks: ours vs speechbrain's per-step expanded-weight build"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aqcf-bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for name, (module_name, help_text) in FAMILIES.items():
        module = importlib.import_module(module_name, __package__)
        p = sub.add_parser(
            name,
            help=help_text,
            description=plain_text(module.__doc__),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        common.add_common_arguments(p)
        p.set_defaults(family_main=module.main, prog=p.prog)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "list", False):  # (a given --out was checked when parsed; this checks the default)
        try:
            common.output_folder(str(args.out))
        except argparse.ArgumentTypeError as e:
            return common.usage_error(args, f"argument --out: {e}")
    common.apply_malloc(args.malloc)
    # SIGTERM (gpu_suite.sh's `timeout` cutting a stage) ends the run through the cleanups, as an error
    # does: the temporary tuning folder is removed and --load's busy processes are killed, not orphaned.
    main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers: only there)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        with common.fresh_tuning_cache():
            return args.family_main(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
