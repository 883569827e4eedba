"""kill -9 at points of a cell's life, then a normal rerun: nothing lost, nothing left.

Each case runs the real CLI through a wrapper (``python -c``) that replaces one function
with a copy sending SIGKILL to its own process on the Nth matching call (before or after
the call), then a plain ``mergelab`` finishes the job. No hook lives in production code.
After every kill: each ``complete`` record has its ``merged/`` checkpoint. After the rerun:
the cell is complete with the reference run's weights digest and scores, one W&B run
holds its summary, and no temporary, partial or claim file is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from harness.tracking import read_offline_run, summary_from_result
from tests.e2e.test_cli import ENV, cli, mergelab

pytestmark = pytest.mark.e2e
CELL = ["method=task_arithmetic", "method.scaling=0.4", "logger.tags=[kill]"]
CLAIM_TIMEOUT = 2.0
FAST_CLAIMS = ["claim.heartbeat=0.2", f"claim.timeout={CLAIM_TIMEOUT}"]

# Replace TARGET (module:attr.path) by a copy that kills the process at its NTH call whose
# repr(args) contains MATCH, BEFORE or AFTER the call; then run the CLI (kernels pinned
# first by importing harness.cli, as the console script does).
WRAPPER = """
import importlib, os, signal, sys
import harness.cli
target, nth, match, when = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
module, _, path = target.partition(":")
owner = importlib.import_module(module)
*parents, name = path.split(".")
for parent in parents:
    owner = getattr(owner, parent)
original, calls = getattr(owner, name), [0]
def killing(*args, **kwargs):
    if match and match not in repr(args):
        return original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = original(*args, **kwargs)
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(owner, name, killing)
sys.argv = ["mergelab", *sys.argv[5:]]
harness.cli.main()
"""


class Kill(NamedTuple):
    target: str
    nth: int = 1
    match: str = ""
    when: str = "before"
    args: tuple[str, ...] = ()  # extra overrides of the killed run


STREAM = ("stream=true", "max_shard_size=20KB")  # streamed into several shards
MERGE = Kill("methods.task_arithmetic:TaskArithmetic.merge_tensor", 3)
RESULT_RENAMED = Kill("os:replace", 1, "result.json", "after")
# (name, kills in order, force: start from the finished reference cell and rerun it forced)
POINTS: list[tuple[str, list[Kill], bool]] = [
    ("claim-created", [Kill("harness.records:CellClaim._link", when="after")], False),
    ("heartbeat", [Kill("harness.records:CellClaim._temp", 3, when="after")], False),
    ("wandb-started", [Kill("harness.tracking:start", when="after")], False),
    ("merge", [MERGE], False),
    (
        "stream-shard",
        [Kill("harness.stream:ShardedCheckpointWriter._flush", 2, args=STREAM)],
        False,
    ),
    (
        "stream-closed",
        [Kill("harness.stream:ShardedCheckpointWriter.close", when="after", args=STREAM)],
        False,
    ),
    ("eval-start", [Kill("harness.run:evaluate")], False),
    ("eval-forward", [Kill("transformers:LlamaForCausalLM.forward", 2)], False),
    ("samples-written", [Kill("harness.run:write_samples_jsonl", when="after")], False),
    ("checkpoint-swapped", [Kill("os:rename", 1, "merged.partial", "after")], False),
    ("fsync-rename", [Kill("os:replace", 1, "result.json")], False),
    ("result-renamed", [RESULT_RENAMED], False),
    ("summary-logged", [Kill("harness.tracking:Tracker.log_result", when="after")], False),
    ("wandb-finish", [Kill("harness.tracking:Tracker._await_log")], False),
    ("claim-release", [Kill("harness.records:CellClaim.release")], False),
    ("takeover", [MERGE, Kill("os:rename", 1, ".stale-", "after")], False),
    (
        "wandb-repair",
        [RESULT_RENAMED, Kill("harness.tracking:Tracker.log_result", when="after")],
        False,
    ),
    ("force-merge", [MERGE], True),
    ("force-wandb-started", [Kill("harness.tracking:start", when="after")], True),
    ("force-demoted", [Kill("harness.stream:ShardedCheckpointWriter.swap_in")], True),
    ("force-old-set-aside", [Kill("os:rename", 1, "merged.old-", "after")], True),
    ("force-swapped", [Kill("os:rename", 1, "merged.partial", "after")], True),
    ("force-fsync-rename", [Kill("os:replace", 2, "result.json")], True),
    (
        "force-no-checkpoint-old-set-aside",
        [Kill("os:rename", 1, "merged.old-", "after", args=("save_merged=false",))],
        True,
    ),
]
DEFAULT = {"heartbeat", "merge", "fsync-rename", "wandb-repair", "force-old-set-aside"}


@pytest.fixture(scope="module")
def reference(tiny_pool, tmp_path_factory) -> tuple[Path, dict]:
    """The cell computed once without interruption."""
    runs = tmp_path_factory.mktemp("reference")
    mergelab(tiny_pool["conf"], runs, *CELL)
    (path,) = runs.glob("*/result.json")
    return runs, json.loads(path.read_text())


def killed(conf: Path, runs: Path, kill: Kill, *overrides: str) -> None:
    base = cli(conf, runs, *CELL, *FAST_CLAIMS, *kill.args, *overrides)[1:]
    cmd = [sys.executable, "-c", WRAPPER, kill.target, str(kill.nth), kill.match, kill.when]
    proc = subprocess.run([*cmd, *base], capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == -9, f"{kill} not reached ({proc.returncode}):\n{proc.stderr[-3000:]}"


def age_set_aside_claims(claims: Path) -> None:
    """Wait until the set-aside claims a kill left are older than the claim timeout: the
    sweep judges them by age alone (their name carries only the taker's token), whereas
    a dead writer's temporary claim file goes at once."""
    for aside in claims.glob("*.stale-*"):
        time.sleep(max(0.0, aside.stat().st_mtime + CLAIM_TIMEOUT + 0.1 - time.time()))


def complete_records_have_checkpoints(runs: Path, ref: dict) -> None:
    for path in runs.glob("*/result.json"):
        record = json.loads(path.read_text())
        if record["status"] == "complete":
            assert (path.parent / "merged" / "model.safetensors").is_file()
            assert record["weights_sha256"] == ref["weights_sha256"]


@pytest.mark.parametrize(
    ("kills", "force"),
    [
        pytest.param(k, f, id=n, marks=() if n in DEFAULT else pytest.mark.slow)
        for n, k, f in POINTS
    ],
)
def test_kill_then_rerun_loses_nothing_and_leaves_nothing(
    tiny_pool, reference, tmp_path, kills, force
):
    ref_runs, ref = reference
    runs = tmp_path / "runs"
    if force:
        shutil.copytree(ref_runs, runs)
    for kill in kills:
        killed(tiny_pool["conf"], runs, kill, f"force={str(force).lower()}")
        complete_records_have_checkpoints(runs, ref)
    claim = runs / ".claims" / f"{ref['cell_id']}.json"
    left_claim = claim.exists()
    age_set_aside_claims(claim.parent)
    out = mergelab(tiny_pool["conf"], runs, *CELL, *FAST_CLAIMS).stdout
    assert ("take over" in out) == left_claim, out

    cell = runs / ref["cell_id"]
    record = json.loads((cell / "result.json").read_text())
    assert record["status"] == "complete"
    assert record["weights_sha256"] == ref["weights_sha256"] and record["scores"] == ref["scores"]
    assert (cell / "merged" / "model.safetensors").is_file()
    leftovers = [*cell.glob(".result.json.*"), *cell.glob("merged.*"), *claim.parent.iterdir()]
    assert not leftovers
    (wandb_run,) = cell.glob("wandb/offline-run-*")
    run = read_offline_run(wandb_run)
    assert run["exit_code"] == 0 and run["run_id"] == ref["cell_id"]
    assert summary_from_result(record).items() <= run["summary"].items()


def test_a_stale_claim_from_another_host_is_taken_over(tiny_pool, reference, tmp_path):
    _, ref = reference
    claims = tmp_path / ".claims"
    claims.mkdir()
    stale = {"host": "elsewhere", "pid": 1, "token": "t", "started": 0.0, "heartbeat": 0.0}
    (claims / f"{ref['cell_id']}.json").write_text(json.dumps(stale))
    out = mergelab(tiny_pool["conf"], tmp_path, *CELL).stdout
    assert f"take over {ref['cell_id']}: the claim of elsewhere pid 1 is stale" in out
    assert "[mergelab] done" in out and not list(claims.iterdir())


def test_a_forced_rerun_without_a_checkpoint_removes_the_old_one(tiny_pool, reference, tmp_path):
    """force=true save_merged=false: the new record must not sit beside the old
    ``merged/``, which it does not describe."""
    ref_runs, ref = reference
    runs = tmp_path / "runs"
    shutil.copytree(ref_runs, runs)
    cell = runs / ref["cell_id"]
    assert (cell / "merged" / "model.safetensors").is_file()
    out = mergelab(tiny_pool["conf"], runs, *CELL, "force=true", "save_merged=false").stdout
    assert f"[mergelab] done {ref['cell_id']}" in out
    record = json.loads((cell / "result.json").read_text())
    assert record["status"] == "complete" and record["weights_sha256"] == ref["weights_sha256"]
    assert record["scores"] == ref["scores"]
    assert not (cell / "merged").exists() and not list(cell.glob("merged.*"))
