"""``aqcf-bench FAMILY [options]``: run one op family's benchmark and write its table, JSON and plot.

Each family is a module with ``add_arguments(parser)`` and ``main(args) -> int``; register new
ones (``model``) in :data:`FAMILIES`.

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
import sys
from collections.abc import Sequence

from . import common

# family -> (module, one-line help).
FAMILIES: dict[str, tuple[str, str]] = {
    "conv": ("benchmarks.conv", "quaternion convolutions 1d/2d/3d vs naive16 and expanded-weight baselines"),
    "attention": ("benchmarks.attention", "the A-QCF block vs materialised and SDPA-composed blocks, 256-16384 tokens"),
    "model": ("benchmarks.model", "A-QCF-Net training step: ours vs expanded-weight convs vs the real-valued twin"),
    "rnn": ("benchmarks.rnn", "quaternion LiGRU/LSTM stacks: ours vs speechbrain's per-step expanded-weight build"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aqcf-bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for name, (module_name, help_text) in FAMILIES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        common.add_common_arguments(p)
        p.set_defaults(family_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.apply_malloc(args.malloc)
    return args.family_main(args)


if __name__ == "__main__":
    sys.exit(main())
