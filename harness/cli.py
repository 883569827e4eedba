"""Console entry points: ``mergelab`` (the Hydra app, one cell per job) and
``mergelab-collect`` (run directories → tables). Both only parse and hand over."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from harness.resolvers import register
from harness.run import run_cell

register()

# Absolute, so the console script finds the repo's conf/ (the README installs editable).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    sweep = cfg.get("sweep") or (Path(hc.sweep.dir).name if multirun else None)
    run_cell(cfg, sweep=sweep)


def main() -> None:
    """``mergelab [overrides]``: run one cell; ``mergelab -m ...`` runs a grid."""
    logging.getLogger("mergelab").setLevel(logging.INFO)
    _app()


def collect_main(argv: list[str] | None = None) -> None:
    """``mergelab-collect RUN_DIR... [--out DIR]``: tidy table, pivots, plot; prints the pivot."""
    from harness.tables import beside_reference, collect, load_reference

    p = argparse.ArgumentParser(prog="mergelab-collect", description=collect_main.__doc__)
    p.add_argument("paths", nargs="+", help="run directories or result.json files")
    p.add_argument("--out", default="tables", help="where tables and the plot are written")
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
    args = p.parse_args(argv)
    tables = collect(args.paths, args.out, metric=args.metric, only=args.only)
    print(tables["pivot"].to_markdown(floatfmt=".4f"))
    if "normalised" in tables and not tables["normalised"].empty:
        print("\nNormalised score (merged ÷ the expert on its own task):\n")
        print(tables["normalised"].to_markdown(floatfmt=".3f"))
    if "own_task" in tables:
        print("\nEach cell on its own task (cells that emit one task's model):\n")
        print(tables["own_task"].to_markdown(floatfmt=".4f"))
    if args.reference:
        side = beside_reference(tables["pivot"], load_reference(args.reference))
        side.to_csv(Path(args.out) / "reference.csv")
        print("\nOurs beside the published numbers (different models and tasks):\n")
        print(side.to_markdown(floatfmt=".4g"))
    print(f"\ntables written to {args.out}/ (scores.png plots the pivot)")
