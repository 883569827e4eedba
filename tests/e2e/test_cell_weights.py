"""Every data-free zoo cell behind the README's tables keeps its merged weights.

``results/cells.json`` records, per cell, the overrides that compose it, its cell id and
the ``weights_sha256`` of its merge: from the scored cell's record (``source: run``) or,
for README rows whose cells the record was not made from, from a merge of the composed
cell (``source: merge``). Each entry is composed again (the cell id proves the
config is the same) and merged tensor by tensor without scoring; the digest must be the
recorded one, so a refactor of a method or of the executor that changes one bit fails
here. Data-dependent cells (AdaMerging, Sens-Merging, Fisher, RegMean, RegMean++;
``"fit": true``) are fitted again through the real CLI with ``eval.limit=1`` (the limit
changes the cell id and the scores, never the weights), about 15 s a cell; they are
skipped on a CPU whose kernel capability differs from the recording machine's, where
float32 training steps may round differently. A cell whose config gained an option with
its old default since it ran keeps its run's id in ``recorded_as``. The training
workflows' cells (BoRA, Merge to Learn) are not recorded.

Regenerate the record from finished cells:
``python -m tests.e2e.test_cell_weights RUNS_DIR [RUNS_DIR ...]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from harness import records
from harness.pool import ModelPool
from harness.stream import execute
from tests.helpers.hydra_conf import compose

RECORD = Path(__file__).resolve().parents[2] / "results" / "cells.json"
DATA_METHODS = ("adamerging", "sens_merging", "fisher", "regmean", "regmean_pp")
TRAINING_METHODS = ("bora", "merge_to_learn")


def overrides_of(record: dict) -> list[str]:
    """The overrides that compose ``record``'s cell (its config choices and the options
    that pick a member or task)."""
    choices = record.get("choices") or {}
    c = record["config"]
    out = [f"method={choices['method']}", f"model={choices['model']}", f"task={choices['task']}"]
    out.append(f"model.seed={c['model']['seed']}")
    for key in ("model", "task"):  # pretrained's member, EMR's task
        if key in c["method"] and c["method"][key] is not None:
            out.append(f"method.{key}={c['method'][key]}")
    return out


def entries(fit: bool) -> list[dict]:
    return [e for e in json.loads(RECORD.read_text())["cells"] if bool(e.get("fit")) == fit]


def _id(entry: dict) -> str:
    return f"{entry['cell_id']}-{entry['label']}"


@pytest.mark.slow
@pytest.mark.parametrize("entry", entries(fit=False), ids=_id)
def test_recorded_cell_merges_to_its_recorded_weights(entry):
    cid, digest = merged_digest(entry["overrides"])
    assert cid == entry["cell_id"], f"{entry['overrides']} composes another cell"
    assert digest == entry["weights_sha256"], f"{entry['label']} merges to other weights"


@pytest.mark.slow
@pytest.mark.parametrize("entry", entries(fit=True), ids=_id)
def test_recorded_data_cell_fits_to_its_recorded_weights(entry, tmp_path):
    capability = records.environment()["cpu_capability"]
    if capability != entry["cpu_capability"]:
        pytest.skip(f"recorded on {entry['cpu_capability']}, this CPU is {capability}")
    c = OmegaConf.to_container(compose(*entry["overrides"]), resolve=True)
    assert records.cell_id(c) == entry["cell_id"], f"{entry['overrides']} composes another cell"
    runs = tmp_path / "runs"
    cmd = ["mergelab", *entry["overrides"], "eval.limit=1", f"runs_dir={runs}"]
    cmd += ["logger.mode=disabled", "fit_cache=false"]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    assert record["weights_sha256"] == entry["weights_sha256"], f"{entry['label']} fits otherwise"


# README rows whose scored cells are not in the runs the record was made from: their
# digests come from a merge of the composed cell (``"source": "merge"``).
MERGE_ONLY = (
    "weight_average", "dare_linear_d055", "dare_ties", "ties_d055", "model_stock",
    "breadcrumbs", "breadcrumbs_ties", "consensus_ta", "metagpt_ties", "metagpt_dare",
)  # fmt: skip


def merged_digest(overrides: list[str]) -> tuple[str, str]:
    """(cell id, weights_sha256) of the composed cell, merged without scoring."""
    cfg = compose(*overrides)
    c = OmegaConf.to_container(cfg, resolve=True)
    before = torch.get_num_threads()
    torch.set_num_threads(int(c["threads"]))
    try:
        pool = ModelPool.from_config(c["model"]).open()
        digest = execute(
            pool, instantiate(cfg.method), lambda n, t: None, seed=c["seed"], progress=False
        )
    finally:
        torch.set_num_threads(before)
    return records.cell_id(c), digest


def main(paths: list[str]) -> None:
    """Write ``results/cells.json`` from the finished data-free zoo cells under ``paths``
    (``"source": "run"``) and the ``MERGE_ONLY`` configs over zoo seeds 0–2."""
    cells = {}
    for root in paths:
        for p in sorted(Path(root).glob("*/result.json")):
            r = json.loads(p.read_text())
            if r.get("status") != "complete" or r["method"]["name"] in TRAINING_METHODS:
                continue
            if (r.get("choices") or {}).get("model") != "zoo_xs":
                continue
            overrides = overrides_of(r)
            cid = records.cell_id(OmegaConf.to_container(compose(*overrides), resolve=True))
            entry = {
                "label": r["method"]["name"],
                "cell_id": cid,
                "overrides": overrides,
                "weights_sha256": r["weights_sha256"],
                "source": "run",
            }
            if cid != r["cell_id"]:
                entry["recorded_as"] = r["cell_id"]
            if r["method"]["name"] in DATA_METHODS:
                entry.update(fit=True, cpu_capability=r["environment"]["cpu_capability"])
            old = cells.setdefault(cid, entry)
            if old["weights_sha256"] != entry["weights_sha256"]:
                raise SystemExit(f"cell {cid} has two digests in {paths}")
    for method in MERGE_ONLY:
        for seed in (0, 1, 2):
            overrides = [f"method={method}", "model=zoo_xs", "task=suite", f"model.seed={seed}"]
            cid, digest = merged_digest(overrides)
            if cid not in cells:
                cells[cid] = {"label": method, "cell_id": cid, "overrides": overrides,
                              "weights_sha256": digest, "source": "merge"}  # fmt: skip
    out = {"cells": sorted(cells.values(), key=lambda e: (e["label"], e["overrides"]))}
    RECORD.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(cells)} cells → {RECORD}")


if __name__ == "__main__":
    main(sys.argv[1:])
