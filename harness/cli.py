"""Console entry points: ``mergelab`` (the Hydra app, one cell per job) and
``mergelab-collect`` (run directories → tables). Both only parse and hand over, after
refusing an override Hydra would silently misread (``model.experts={}``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from harness.kernels import pin_cpu_kernels

pin_cpu_kernels()  # before anything imports torch

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from core.sources import PoolError  # noqa: E402
from harness.resolvers import register  # noqa: E402
from harness.run import run_cell  # noqa: E402

register()

# Absolute, so the console script finds the repo's conf/ (the README installs editable).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def job(cfg: DictConfig) -> None:
    """Hydra's task function: one cell. Launchers that run it in another process pickle it
    (submitit: SLURM array tasks, ``hydra/launcher=local``), so it is a plain module-level
    function, pickled by reference: the job imports this module, which pins the CPU kernels
    before torch loads and registers the resolvers, before composing its config."""
    logging.getLogger("mergelab").setLevel(logging.INFO)
    hc = HydraConfig.get()
    refuse_empty_experts(list(hc.overrides.task), list(cfg.model.get("experts") or {}))
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    sweep = cfg.get("sweep") or (Path(hc.sweep.dir).name if multirun else None)
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    run_cell(cfg, sweep=sweep, choices=choices)


# Decorated apart from ``job``, so ``harness.cli.job`` stays the undecorated function that
# Hydra hands to the launcher (cloudpickle pickles a function by value unless its module
# attribute is that very object).
_app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(job)


def refuse_empty_experts(overrides: list[str], experts: list[str]) -> None:
    """Refuse ``model.experts={}``: Hydra merges the empty mapping into the model config's
    experts, which keeps every one of them (``experts``, as composed), so the override would
    silently run the full pool. The error names the overrides that do empty or select it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):
        if o.key_or_group == "model.experts" and not o.is_delete() and o.value() == {}:
            drop = " ".join(f"~model.experts.{e}" for e in experts[1:])
            example = f", e.g. {drop} keeps {experts[0]}" if drop else ""
            raise PoolError(
                f"{o.input_line} does not empty the pool: Hydra merges an empty mapping into "
                f"model.experts, so all its experts ({', '.join(experts) or 'none'}) would "
                "still run. Run with no experts (a method that trains its own) with "
                f"~model.experts; select experts by dropping the others with "
                f"~model.experts.NAME{example}; or replace them all with ~model.experts "
                "+model.experts.NAME.path=DIR."
            )


def main() -> None:
    """``mergelab [overrides]``: run one cell; ``mergelab -m ...`` runs a grid (cells in
    this process, or one job each with ``hydra/launcher=slurm|local|joblib``)."""
    _app()


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--level {text}: must lie strictly between 0 and 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a non-negative integer")
    return value


def collect_main(argv: list[str] | None = None) -> None:
    """``mergelab-collect RUN_DIR... [--out DIR]``: tidy table, pivots with bootstrap
    intervals, plots; prints the tables (and with ``--baseline``, paired comparisons)."""
    from harness.tables import beside_reference, collect, load_reference, log_wandb, markdown

    p = argparse.ArgumentParser(prog="mergelab-collect", description=collect_main.__doc__)
    p.add_argument("paths", nargs="+", help="run directories or result.json files")
    p.add_argument("--out", default="tables", help="where tables and the plots are written")
    p.add_argument("--metric", default=None, help="metric to pivot (default: each task's primary)")
    p.add_argument(
        "--reference",
        nargs="*",
        default=[],
        help="published numbers (results/reference/*.csv) to print beside ours",
    )
    p.add_argument(
        "--only",
        default=None,
        help="regex: keep merge rows whose label matches (base/experts always kept)",
    )
    p.add_argument(
        "--bootstrap",
        type=_count,
        default=10_000,
        metavar="N",
        help="bootstrap resamples of the items for the intervals (0: no intervals)",
    )
    p.add_argument("--bootstrap-seed", type=_count, default=0, help="seed of the resampling")
    p.add_argument(
        "--level", type=_unit_interval, default=0.95, help="interval coverage (default 0.95)"
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="LABEL",
        help="write compare.*: every other label minus LABEL on the same items, paired",
    )
    p.add_argument(
        "--wandb",
        choices=("offline", "online", "disabled"),
        default="offline",
        help="log the tables to W&B (offline: under OUT/wandb)",
    )
    p.add_argument("--wandb-project", default="mergelab", help="W&B project of the collect run")
    args = p.parse_args(argv)
    tables = collect(
        args.paths,
        args.out,
        metric=args.metric,
        only=args.only,
        n_boot=args.bootstrap,
        level=args.level,
        seed=args.bootstrap_seed,
        baseline=args.baseline,
    )
    level = f"{args.level:.0%}"
    print(f"Scores [{level} bootstrap interval over items] ± sd across replicates (n):\n")
    print(markdown(tables["pivot"], ".4f"))
    if not tables["normalised"].empty:
        print("\nNormalised score (merged ÷ the expert on its own task):\n")
        print(markdown(tables["normalised"], ".3f"))
    if "own_task" in tables:
        print("\nEach cell on its own task (cells that emit one task's model):\n")
        print(markdown(tables["own_task"], ".4f"))
    if "compare" in tables:
        print(
            f"\nΔ = label − {args.baseline} on the same items ({level} paired bootstrap "
            "interval; * = excludes 0; p = exact McNemar for 0/1 metrics):\n"
        )
        print(markdown(tables["compare"], ".4f"))
    if args.reference:
        side = beside_reference(tables["pivot"], load_reference(args.reference))
        side.to_csv(Path(args.out) / "reference.csv")
        print("\nOurs beside the published numbers (different models and tasks):\n")
        print(side.to_markdown(floatfmt=".4g"))
    log_wandb(tables, args.out, mode=args.wandb, project=args.wandb_project)
    print(f"\ntables written to {args.out}/ (scores.png plots the pivot)")
