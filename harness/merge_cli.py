"""``mergelab-merge``: the merge alone, without evaluation.

    mergelab-merge method=ties model=zoo_xs out=DIR [seed=N device=D threads=N
                   max_shard_size=S force=true]
    mergelab-merge --mergekit CONFIG.yml OUT [seed=N device=D threads=N ...]
                   [method.KEY=VALUE model.KEY=VALUE ...]

The first form is a Hydra app over the repo's ``conf/`` (``conf/merge.yaml``: the same
``method`` and ``model`` groups as ``mergelab``, ``--config-dir`` for your own). The second
reads a mergekit YAML and translates it (:func:`harness.mergekit_config.from_mergekit`:
mergekit's conventions selected through the methods' options), then takes the same path;
``method.*`` / ``model.*`` overrides change the translation (recorded, and the record no
longer calls the merge the YAML's).

Both run what a ``mergelab`` cell runs before scoring, with the same pieces: the top-level
options checked by :func:`harness.checks.check_run_options`, the method built by
:func:`harness.checks.build_method`, ``ModelPool.from_config(...).open()`` and
``check_compatible()``, :func:`harness.stream.execute` into a
:class:`harness.stream.ShardedCheckpointWriter` (closed with
:func:`harness.stream.model_card`, then swapped in), so the same method, pool, seed and
threads give the cell's ``weights_sha256``. ``out`` then holds the sharded HF checkpoint
(``from_pretrained`` loads it), its card (``README.md``), ``mergelab_merge.json`` (method,
options and report, pool, seed, weights_sha256, timings, versions; for ``--mergekit`` the
source YAML, what mergekit ignores and what is not bit-identical) and, where mergekit
0.1.5 has the same merge, its YAML (``mergekit_config.yml``).

Decisions:
- Data-dependent methods (``needs_data``: AdaMerging, Sens-Merging, Fisher, RegMean) and
  training workflows (BoRA, Merge to Learn) are refused, pointing to ``mergelab``: their fit
  needs tasks, calibration prompts and the fit cache, which a cell has and this command
  does not take.
- ``out`` is replaced only when it is missing, empty, or a previous ``mergelab-merge``
  output (it holds ``mergelab_merge.json``); anything else needs ``force=true``. Never (not
  even forced): ``/``, the home directory, a directory holding the working directory, or
  one holding a pool member's checkpoint. The checkpoint is written beside ``out``
  (``<out>.partial-*``) and swapped in complete, so an interrupted merge leaves ``out`` as
  it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.kernels import pin_cpu_kernels

pin_cpu_kernels()  # before anything imports torch

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from harness.resolvers import register  # noqa: E402

register()

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RECORD = "mergelab_merge.json"
MERGEKIT_FILE = "mergekit_config.yml"
SCHEMA = 1
TOOL = "mergelab-merge"
TOP_OPTIONS = ("seed", "device", "threads", "max_shard_size", "force")
USAGE = (
    "usage: mergelab-merge method=NAME model=NAME out=DIR [seed=N device=D threads=N "
    "max_shard_size=S force=true]\n"
    "       mergelab-merge --mergekit CONFIG.yml OUT [seed=N device=D threads=N "
    "max_shard_size=S force=true] [method.KEY=VALUE model.KEY=VALUE]"
)


class MergeError(ValueError):
    """A bad ``mergelab-merge`` input; the message names the option and the fix."""


def _say(message: str) -> None:
    print(f"[{TOOL}] {message}", flush=True)


# ------------------------------------------------------------------------------ output


def is_merge_output(directory: Path) -> bool:
    """Whether ``directory`` is a previous ``mergelab-merge`` output (holds its record)."""
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("tool") == TOOL


def check_out(out: Any, force: bool) -> Path:
    """The output directory, refused (with the fix) when it may not be replaced."""
    if out is None or out == "???" or str(out).strip() == "":
        raise MergeError(f"out=DIR is required: where the merged checkpoint goes\n{USAGE}")
    path = Path(str(out)).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise MergeError(f"out={out} is a file, not a directory: choose a directory path")
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved in {Path("/").resolve(), Path.home().resolve(), cwd, *cwd.parents}:
        raise MergeError(
            f"out={out} is the root, the home directory or holds the working directory; "
            "mergelab-merge replaces out as a whole: choose a new directory, e.g. out=merged/NAME"
        )
    if not isinstance(force, bool):
        raise MergeError(f"force={force!r} must be true or false")
    if path.is_dir() and any(path.iterdir()) and not is_merge_output(path) and not force:
        raise MergeError(
            f"out={out} exists, is not empty and is not a mergelab-merge output (no {RECORD}): "
            "choose another out=, or add force=true to replace it (everything in it is deleted)"
        )
    return path


def _check_out_vs_pool(out: Path, dirs: Mapping[str, Path]) -> None:
    target = out.resolve()
    for member, d in dirs.items():
        d = Path(d).resolve()
        if d == target or target in d.parents:
            raise MergeError(
                f"out={out} holds pool member {member!r}'s checkpoint ({d}); it would be "
                "deleted when the merge is swapped in: choose another out="
            )


# ------------------------------------------------------------------------------- merge


def merge(
    c: dict[str, Any],
    *,
    choices: Mapping[str, str] | None = None,
    mergekit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge ``c`` (resolved ``method``, ``model``, ``out`` and the top-level options) into
    ``c["out"]``; return the record written there as ``mergelab_merge.json``. ``mergekit``:
    the translation's options when the config came from a mergekit YAML."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = check_out(c.get("out"), c.get("force", False))  # before the slow imports

    import torch

    from evals import sandbox
    from harness import records
    from harness.checks import build_method, check_run_options
    from harness.pool import ModelPool
    from harness.stream import ShardedCheckpointWriter, execute, mergekit_equivalent, model_card

    with records.timed(timings, "check"):
        check_run_options({**c, "sandbox": sandbox.current_mode()})
        method = build_method(OmegaConf.create(c["method"]))
        _refuse_fitted(method, c, (choices or {}).get("method"))
        pool = ModelPool.from_config(c["model"], require_experts=method.uses_experts).open()
        pool.check_compatible()
        _check_out_vs_pool(out, pool.dirs)
    if mergekit is not None:
        dtype_notes = _dtype_notes(pool, mergekit)
        mergekit = {
            **mergekit,
            "notes": [*mergekit["notes"], *dtype_notes],
            "exact": mergekit["exact"] and not dtype_notes,
        }
        for note in mergekit["notes"]:
            _say(f"note: {note}")
    if c.get("threads") is not None:
        torch.set_num_threads(int(c["threads"]))
    torch.manual_seed(c["seed"])
    config = {k: c[k] for k in ("method", "model", "seed", "device", "threads", "max_shard_size")}
    merge_id = records.config_digest(
        {k: config[k] for k in ("method", "model", "seed", "device", "threads")}
    )
    if out.is_dir() and any(out.iterdir()):
        _say(f"replacing {out}")
    _say(
        f"merge {merge_id}: {method.name} over {pool.name} (base + {', '.join(pool.expert_names)})"
    )
    writer = ShardedCheckpointWriter(out, c["max_shard_size"])
    try:
        with records.timed(timings, "merge"):
            digest = execute(pool, method, writer, seed=c["seed"], device=c["device"])
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "tool": TOOL,
            "status": "complete",
            "merge_id": merge_id,
            "cell_id": merge_id,  # the name harness.stream.model_card gives the merge
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "choices": dict(choices or {}),
            "config": config,
            "method": {
                "name": method.name,
                "params": records.method_params(c["method"]),
                "report": method.report(),
            },
            "pool": pool.describe(),
            "seed": c["seed"],
            "device": c["device"],
            "threads": c.get("threads"),
            "weights_sha256": digest,
            "mergekit": mergekit,
        }
        with records.timed(timings, "save"):
            text, why = mergekit_equivalent(record, pool.dirs)
            if why:
                _say(f"note: no {MERGEKIT_FILE}: {why}")
            tmp = writer.close(pool, model_card(record, text, why))
            if text is not None:
                (tmp / MERGEKIT_FILE).write_text(text)
            record["mergekit_equivalent"] = MERGEKIT_FILE if text is not None else None
        timings["total"] = round(time.perf_counter() - t_start, 4)
        record.update(timings=timings, versions=records.versions())
        records.write_json_atomic(tmp / RECORD, record)
        writer.swap_in()
    except BaseException:
        shutil.rmtree(writer.tmp, ignore_errors=True)
        raise
    _say(f"done {merge_id}: {method.name} → {out} (weights_sha256 {digest})")
    return record


def _refuse_fitted(method: Any, c: Mapping[str, Any], choice: str | None) -> None:
    """Data-dependent methods and training workflows run as ``mergelab`` cells."""
    target = c["method"].get("_target_", method.name)
    if not method.uses_experts or method.needs_data:
        kind = (
            "is a training workflow (it trains its own members)"
            if not method.uses_experts
            else "learns from data (calibration prompts of the tasks)"
        )
        raise MergeError(
            f"method {method.name} ({target}) {kind}: mergelab-merge runs data-free merges "
            f"only. Run it as a cell: mergelab method={choice or method.name} model=... "
            "task=... (the merged checkpoint is kept in <runs_dir>/<cell_id>/merged)"
        )


def _dtype_notes(pool: Any, mergekit: Mapping[str, Any]) -> list[str]:
    """mergekit without ``dtype`` computes in each tensor's stored dtype: a note when that
    is not float32 (mergelab computes in float32)."""
    if mergekit.get("compute_dtype") is not None:
        return []
    src = pool.sources["base"]
    stored = sorted({str(src.dtype(n)).removeprefix("torch.") for n in pool.tensor_names()
                     if pool.is_merged(n)} - {"float32"})  # fmt: skip
    if not stored:
        return []
    return [
        f"no dtype: mergekit computes in the stored dtype ({', '.join(stored)}), mergelab in "
        "float32: the weights differ by rounding; add dtype: float32 (and out_dtype) to the "
        "YAML for mergekit to compute as mergelab does"
    ]


# --------------------------------------------------------------------------- front ends


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="merge")
def _app(cfg: DictConfig) -> None:
    c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    choices = {
        k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")
    }
    _run(lambda: merge(c, choices=choices))


def _run(job: Any) -> None:
    """Run ``job``; a bad input (a ``ValueError``, also as the cause of Hydra's
    instantiation error: a method option) ends with its message and exit status 2."""
    from hydra.errors import InstantiationException

    try:
        job()
    except ValueError as err:  # MergeError, MergekitConfigError, PoolError, option errors
        _fail(err)
    except InstantiationException as err:
        if not isinstance(err.__cause__, ValueError):
            raise
        _fail(err.__cause__)


def _fail(err: BaseException) -> None:
    print(f"{TOOL}: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def mergekit_main(argv: Sequence[str]) -> None:
    """``--mergekit CONFIG.yml OUT [seed=N ...] [method.KEY=V model.KEY=V ...]``:
    translate, report, merge. ``method.*`` / ``model.*`` overrides change the translated
    configs (e.g. ``method.trim_scope=global`` for mergelab's own TIES on the same YAML);
    the merge is then no longer the YAML's, and the record says so."""
    from harness.mergekit_config import from_mergekit

    args = list(argv)
    if args and args[0].startswith("--mergekit="):
        args = ["--mergekit", args[0].split("=", 1)[1], *args[1:]]
    positional = [a for a in args[1:] if "=" not in a]
    overrides = [a for a in args[1:] if "=" in a]
    if len(positional) != 2:
        _fail(MergeError(f"--mergekit takes a mergekit YAML and an output directory\n{USAGE}"))
    source, out = positional
    top = [o for o in overrides if o.split("=", 1)[0] in TOP_OPTIONS]
    changes = [o for o in overrides if o.startswith(("method.", "model."))]
    bad = [o for o in overrides if o not in top and o not in changes]
    if bad:
        _fail(
            MergeError(
                f"{bad}: with --mergekit only {list(TOP_OPTIONS)} and method.KEY=VALUE / "
                "model.KEY=VALUE overrides of the translated configs may be set (the method "
                "and pool come from the YAML: edit it, or use method=/model= without --mergekit)"
            )
        )

    def job() -> None:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("merge", overrides=top)
        c = {k: cfg[k] for k in TOP_OPTIONS}
        method_cfg, model_cfg, options = from_mergekit(source)
        _say(f"{source}: mergekit {options['merge_method']} → {method_cfg['_target_']}")
        if changes:
            merged = OmegaConf.merge(
                OmegaConf.create({"method": method_cfg, "model": model_cfg}),
                OmegaConf.from_dotlist(changes),
            )
            both = OmegaConf.to_container(merged)
            method_cfg, model_cfg = both["method"], both["model"]  # type: ignore[index]
            options = {
                **options,
                "overrides": changes,
                "exact": False,
                "notes": [
                    *options["notes"],
                    f"{' '.join(changes)} changed the translation: this is no longer the "
                    "YAML's merge",
                ],
            }
        merge(
            {**c, "method": method_cfg, "model": model_cfg, "out": out},
            choices={"mergekit": str(source)},
            mergekit=options,
        )

    _run(job)


def main(argv: Sequence[str] | None = None) -> None:
    """``mergelab-merge``: the Hydra form, or ``--mergekit CONFIG OUT``."""
    logging.getLogger("mergelab").setLevel(logging.INFO)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and (args[0] == "--mergekit" or args[0].startswith("--mergekit=")):
        mergekit_main(args)
        return
    if any(a == "--mergekit" or a.startswith("--mergekit=") for a in args):
        _fail(MergeError(f"--mergekit must come first\n{USAGE}"))
    _app()
