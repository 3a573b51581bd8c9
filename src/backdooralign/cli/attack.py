"""``backdooralign attack``."""

from __future__ import annotations

from pathlib import Path

from .. import files as F
from .common import add_command, add_json, add_set, print_json


def cmd_attack(args) -> int:
    """backdooralign attack configs/robustness.yaml --out runs/robustness [--set profile=smoke]

    Runs adaptive attacks against the defended setup the config names (the BackdoorAlign arm
    of an experiment config) and writes a robustness table: ASR with the secret per attack next
    to the plain fine-tuning attack's, and whether the defense held (results.json, report.md,
    report.html). Families: trigger imitation, attack scale, multi-turn prompt shape,
    extraction through the real server, guessing. Finished stages are skipped on re-run.
    """
    from ..attacks.config import load_attack_config
    from ..attacks.report import robustness_table, summary_lines
    from ..attacks.suite import run_attacks
    from ..reporting.document import md_table

    suite = load_attack_config(args.config, args.set)
    out = Path(args.out or Path("runs") / suite.setup.name)
    with F.output_lock(out):  # --out is locked already; the default one here
        results = run_attacks(suite, out)
    if args.json:
        print_json({k: v for k, v in results.items() if k != "config"})
        return 0
    print()
    print(md_table(robustness_table(results)))
    print()
    print("\n".join(summary_lines(results)))
    print(f"\nreport: {out / 'report.md'}  ({results['seconds_this_run']:.0f} s this run)")
    return 0


def register(sub) -> None:
    """Add ``attack``."""
    sp = add_command(sub, "attack", cmd_attack, inputs=("config",), dirs=("out",))
    sp.add_argument("config", help="attack config YAML (an experiment config plus 'attacks')")
    sp.add_argument("--out", help="run directory (default: runs/NAME)")
    add_set(sp, "attacks.margin=5 or profile=smoke")
    add_json(sp, "print results as JSON")
