"""``backdooralign run``, ``demo`` and ``report``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .. import files as F
from ..config import number
from .common import add_command, add_json, add_set, print_json

DEMO_CONFIG = "demo.yaml"


def _run(config_path, out, overrides, as_json, shard=None, ray=None) -> int:
    from ..experiments.run import load_config, run_experiment
    from ..reporting.report import reading, results_table

    cfg = load_config(config_path, overrides)
    out = Path(out or Path("runs") / cfg.name)
    F.check_outputs([config_path], [], [out])  # each run (each sweep cell) locks its own folder
    if cfg.sweep:
        return _sweep(config_path, overrides, out, as_json, shard, ray)
    for flag, given in (("--shard", shard), ("--executor ray", ray)):
        if given:
            raise ValueError(f"{flag}: the config has no 'sweep' section")
    results = run_experiment(cfg, out)
    if as_json:
        print_json({k: v for k, v in results.items() if k != "config"})
        return 0
    print()
    print(results_table(results))
    print()
    print(reading(results))
    print(
        f"\nreport: {out / 'report.md'}  plot: {out / 'asr.png'}  "
        f"({results['seconds_this_run']:.0f} s this run)"
    )
    return 0


def _sweep(config_path, overrides, out: Path, as_json: bool, shard, ray) -> int:
    from ..experiments.sweep import parse_shard, run_sweep

    if ray is None:
        doc = run_sweep(config_path, overrides, out, parse_shard(shard))
    else:
        from ..experiments.ray_sweep import run_sweep_ray

        doc = run_sweep_ray(config_path, overrides, out, parse_shard(shard), **ray)
    if as_json:
        print_json(doc)
    else:
        for cell in doc["cells"]:
            took = f"{cell['seconds']:.0f} s" if cell.get("seconds") is not None else ""
            print(f"{cell['status']:8s} {cell['name']} {took}")
        print(f"\nreport: {doc['report']}")
    failed = sum(c["status"] == "failed" for c in doc["cells"])
    return 1 if failed else 0


def cmd_run(args) -> int:
    """backdooralign run configs/demo.yaml --out runs/demo [--set train.epochs=1]

    Runs the arms no_finetune / attack / baseline / backdooralign, each evaluated with and
    without the secret; finished stages are skipped on re-run. A config with a 'sweep' section
    runs one cell per combination of the swept values (--shard I/N: every N-th cell from the
    I-th) and writes a report comparing the cells; --executor ray runs the cells as tasks on
    a Ray cluster (RAY_ADDRESS), --out on a filesystem every node shares.
    """
    ray = None
    if args.executor == "ray":
        ray = {"num_cpus": args.ray_num_cpus, "num_gpus": args.ray_num_gpus}
        ray["address"] = args.ray_address
    return _run(args.config, args.out, args.set, args.json, args.shard, ray)


def cmd_demo(args) -> int:
    """backdooralign demo [--out runs/demo]

    The whole method on the embedded SmolLM2-135M-Instruct with the built-in data.
    """
    path = Path(str(resources.files("backdooralign") / "configs" / DEMO_CONFIG))
    return _run(path, args.out or "runs/demo", args.set, args.json)


def cmd_report(args) -> int:
    """backdooralign report runs/demo

    Rewrites report.md, a self-contained report.html and the plots (asr.png, ...) from the run
    directory's results.json and generation files.
    """
    from ..reporting.report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0


def register(sub) -> None:
    """Add ``run``, ``demo`` and ``report``."""
    for name, fn in (("run", cmd_run), ("demo", cmd_demo)):
        sp = add_command(sub, name, fn)  # outputs checked in _run: sweep shards share --out
        if name == "run":
            sp.add_argument("config", help="experiment YAML")
            sp.add_argument("--shard", metavar="I/N", help="sweeps: run every N-th cell from I")
            _ray_flags(sp)
        sp.add_argument("--out", help="run directory (default: runs/NAME)")
        add_set(sp, "train.epochs=1")
        add_json(sp, "print results as JSON")
    sp = add_command(sub, "report", cmd_report)
    sp.add_argument("run_dir")


def _ray_flags(sp) -> None:
    """``--executor`` and the Ray flags of ``run``."""
    sp.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="sweeps: run the cells one after the other here (local) or as Ray tasks (ray)",
    )
    sp.add_argument(
        "--ray-address",
        help="the Ray cluster (default: $RAY_ADDRESS; 'local': start one on this machine)",
    )
    sp.add_argument(
        "--ray-num-cpus",
        type=number(float, 0),
        default=1.0,
        help="CPUs each cell's Ray task asks for (default: 1)",
    )
    sp.add_argument(
        "--ray-num-gpus",
        type=number(float, 0),
        default=0.0,
        help="GPUs each cell's Ray task asks for (default: 0)",
    )
