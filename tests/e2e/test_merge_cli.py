"""``mergelab-merge`` end to end through the real console script on the tiny pool.

- The Hydra form (``--config-dir`` with ``model=tiny``) writes a sharded checkpoint that
  ``from_pretrained`` loads, with its card, ``mergelab_merge.json`` and (where mergekit has
  the merge) ``mergekit_config.yml``; its ``weights_sha256`` is the digest of the written
  tensors and equals a ``mergelab`` cell's for the same method, pool and seed (TIES, and
  DARE, whose masks depend on the seed).
- ``--mergekit``: a mergekit YAML over the tiny pool's directories, translated and merged;
  the YAML the output carries reads back to the same weights.
- Bad inputs stop before merging with the option and the fix named: a missing ``out``, a
  foreign non-empty ``out`` (``force=true`` replaces it; a previous output is replaced
  without), ``out`` holding a pool member, data-dependent methods, bad top-level options,
  and mergekit YAMLs mergelab cannot reproduce (``slices``, gradients, per-model
  densities, unknown methods and keys, LoRA references, other tokenizers, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.merge_cli import MERGEKIT_FILE, RECORD, main
from harness.mergekit_config import MergekitConfigError, from_mergekit

pytestmark = pytest.mark.e2e
ENV = {**os.environ, "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [shutil.which("mergelab-merge") or "mergelab-merge", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny(conf: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("--config-dir", str(conf), "model=tiny", *args, check=check)


def digest_of(directory: Path, base: Path) -> str:
    """``harness.stream.execute``'s digest recomputed from the written shards: every
    tensor's name, dtype, shape and bytes in the base checkpoint's order."""
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", framework="pt") as st:
        order = list(st.keys())
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        where = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        where = dict.fromkeys(order, directory / "model.safetensors")
    h = hashlib.sha256()
    for name in order:
        with safe_open(where[name], framework="pt") as st:
            t = st.get_tensor(name).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def merged(tiny_pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "ties"
    tiny(
        tiny_pool["conf"],
        "method=ties",
        "method.density=0.5",
        "seed=1",
        "max_shard_size=40KB",
        f"out={out}",
    )
    return out


def test_checkpoint_loads_with_card_and_record(merged, tiny_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((merged / RECORD).read_text())
    assert record["tool"] == "mergelab-merge" and record["status"] == "complete"
    assert record["method"]["name"] == "ties" and record["method"]["params"]["density"] == 0.5
    assert record["seed"] == 1 and record["pool"]["name"] == "tiny"
    assert {"check", "merge", "save", "total"} <= set(record["timings"])
    assert record["versions"]["torch"].startswith("2.")
    assert (merged / "model.safetensors.index.json").is_file()  # sharded at 40KB
    assert len(list(merged.glob("model-*.safetensors"))) > 1
    card = (merged / "README.md").read_text()
    assert "mergelab" in card and record["merge_id"] in card and "density: 0.5" in card
    assert record["mergekit_equivalent"] is None  # TIES' global trim: mergekit has none
    assert not (merged / MERGEKIT_FILE).exists()
    assert record["weights_sha256"] == digest_of(merged, tiny_pool["base"])
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert model.config.num_hidden_layers == 2 and tok("2+2=")["input_ids"]
    assert not list(merged.parent.glob("ties.partial-*"))


def test_same_weights_sha256_as_a_mergelab_cell(tiny_pool, tmp_path):
    """Same method, pool and seed: the cell's digest (TIES and DARE, seed 1)."""
    runs = tmp_path / "runs"
    cmd = [shutil.which("mergelab") or "mergelab", "--config-dir", str(tiny_pool["conf"])]
    cmd += ["-m", "model=tiny", "task=tiny", "method=ties,dare_ties", "seed=1"]
    cmd += ["eval.limit=1", "logger.mode=disabled", f"runs_dir={runs}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = {
        (r := json.loads(p.read_text()))["method"]["name"]: r["weights_sha256"]
        for p in runs.glob("*/result.json")
    }
    for method in ("ties", "dare_ties"):
        out = tmp_path / method
        proc = tiny(tiny_pool["conf"], f"method={method}", "seed=1", f"out={out}")
        record = json.loads((out / RECORD).read_text())
        assert record["weights_sha256"] == cells[method], method
        assert f"weights_sha256 {cells[method]}" in proc.stdout and str(out) in proc.stdout


def test_out_is_replaced_only_when_safe(tiny_pool, tmp_path):
    conf = tiny_pool["conf"]
    out = tmp_path / "out"
    tiny(conf, "method=task_arithmetic", f"out={out}")
    first = json.loads((out / RECORD).read_text())["weights_sha256"]
    proc = tiny(conf, "method=task_arithmetic", "method.scaling=0.5", f"out={out}")
    assert "replacing" in proc.stdout  # a previous mergelab-merge output: no force needed
    assert json.loads((out / RECORD).read_text())["weights_sha256"] != first

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = tiny(conf, "method=task_arithmetic", f"out={foreign}", check=False)
    assert proc.returncode == 2
    assert "is not a mergelab-merge output" in proc.stderr and "force=true" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
    tiny(conf, "method=task_arithmetic", f"out={foreign}", "force=true")
    assert not (foreign / "notes.txt").exists() and (foreign / RECORD).is_file()

    member = tiny_pool["add"]
    proc = tiny(conf, "method=task_arithmetic", f"out={member}", "force=true", check=False)
    assert proc.returncode == 2 and "holds pool member 'add'" in proc.stderr
    assert (member / "config.json").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["method=ties"], "out=DIR is required"),
        (["method=adamerging_short", "out=OUT"], "mergelab method=adamerging_short model="),
        (["method=bora", "out=OUT"], "training workflow"),
        (["method=ties", "seed=abc", "out=OUT"], "seed='abc' must be an integer"),
        (["method=ties", "threads=0", "out=OUT"], "threads=0 must be a positive integer"),
        (["method=ties", "max_shard_size=big", "out=OUT"], "max_shard_size='big' is not a size"),
        (["method=ties", "force=maybe", "out=OUT"], "force='maybe' must be true or false"),
        (["method=ties", "+method.bogus=1", "out=OUT"], "method.bogus is not an option"),
        (["method=ties", "method.density=2", "out=OUT"], "method.density must be in (0, 1]"),
        (["method=ties", "out=/"], "choose a new directory"),
    ],
    ids=[
        "no_out",
        "data",
        "training",
        "seed",
        "threads",
        "shard",
        "force",
        "option",
        "value",
        "root",
    ],
)
def test_bad_inputs_are_named_with_their_fix(
    tiny_pool, tmp_path, monkeypatch, capsys, args, expected
):
    """In process (``main`` reads ``sys.argv`` as the console script does), to save a
    process start per case; the console script's own exit path is tested above."""
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    argv = ["mergelab-merge", "--config-dir", str(tiny_pool["conf"]), "model=tiny", *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def _mergekit_yaml(pool: dict[str, Path], **extra) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(pool["base"]),
        "dtype": "float32",
        "models": [
            {"model": str(pool["add"]), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(pool["color"]), "parameters": {"weight": 0.45, "density": 0.5}},
        ],
        **extra,
    }


def test_mergekit_yaml_merges_and_reads_back(tiny_pool, tmp_path):
    """``--mergekit`` on the tiny pool (DARE-TIES, mergekit's defaults): notes printed,
    the output carries the equivalent YAML, which reads back to the same weights."""
    src = tmp_path / "dare.yml"
    src.write_text(yaml.safe_dump(_mergekit_yaml(tiny_pool)))
    out = tmp_path / "dare"
    proc = run("--mergekit", str(src), str(out), "seed=5")
    assert "mergekit dare_ties → methods.dare.DARETies" in proc.stdout
    assert "--random-seed stream" in proc.stdout
    record = json.loads((out / RECORD).read_text())
    assert record["mergekit"]["source"] == str(src) and record["mergekit"]["exact"]
    params = record["method"]["params"]
    assert params["mask_rng"] == "mergekit" and params["normalize"] is False
    assert params["weights"] == {"add": 0.7, "color": 0.45}
    emitted = (out / MERGEKIT_FILE).read_text()
    assert "--random-seed 5" in emitted
    again = run("--mergekit", str(out / MERGEKIT_FILE), str(tmp_path / "again"), "seed=5")
    assert record["weights_sha256"] in again.stdout

    proc = run("--mergekit", str(src), str(tmp_path / "x"), "method=ties", check=False)
    assert proc.returncode == 2 and "only ['seed'" in proc.stderr

    # method.* overrides change the translation, and the record says it is no longer exact
    main(["--mergekit", str(src), str(tmp_path / "own"), "seed=5", "method.mask_rng=mergelab"])
    own = json.loads((tmp_path / "own" / RECORD).read_text())
    assert own["mergekit"]["exact"] is False and own["mergekit"]["overrides"]
    assert own["method"]["params"]["mask_rng"] == "mergelab"
    assert own["weights_sha256"] != record["weights_sha256"]
    assert not (tmp_path / "own" / MERGEKIT_FILE).exists()  # mergelab's masks: no equivalent


BAD_YAML = {
    "slices": (
        {"slices": [{"sources": [{"model": "A", "layer_range": [0, 2]}]}]},
        "slices: mergelab merges whole checkpoints",
    ),
    "gradient": (
        {"parameters": {"lambda": [0.1, 0.5]}},
        "parameters.lambda: [0.1, 0.5] varies over layers",
    ),
    "densities": (
        {
            "models": [
                {"model": "A", "parameters": {"weight": 1, "density": 0.3}},
                {"model": "B", "parameters": {"weight": 1, "density": 0.5}},
            ]
        },
        "density differs between models",
    ),  # fmt: skip
    "method": ({"merge_method": "nuslerp"}, "mergelab has no nuSLERP"),
    "unknown_method": ({"merge_method": "tie"}, "'tie' is not a mergekit 0.1.5 method"),
    "key": ({"merge_methd": "ties"}, "unknown key(s) ['merge_methd']"),
    "param": ({"parameters": {"lamda": 1}}, "parameters.lamda is not a parameter"),
    "shared_per_model": (
        {"models": [{"model": "A", "parameters": {"weight": 1, "lambda": 2}}]},
        "models[0].parameters.lambda: mergekit reads lambda only from the top-level",
    ),
    "weight_missing": (
        {"models": [{"model": "A", "parameters": {"density": 0.5}}]},
        "weight is required by mergekit's dare_ties",
    ),
    "negative": (
        {"models": [{"model": "A", "parameters": {"weight": -1.0}}]},
        "mergelab's weights are finite and >= 0",
    ),
    "lora": ({"models": [{"model": "A+L", "parameters": {"weight": 1}}]}, "names a LoRA"),
    "tokenizer": ({"tokenizer_source": "union"}, "tokenizer_source: 'union'"),
    "chat": ({"chat_template": "chatml"}, "chat_template: mergelab copies"),
    "no_base": ({"base_model": None}, "base_model: dare_ties needs a base model"),
    "filter_wise": (
        {
            "merge_method": "model_stock",
            "parameters": {"filter_wise": True},
            "models": [{"model": "A"}, {"model": "B"}],
        },
        "filter_wise: true",
    ),  # fmt: skip
    "della_bounds": (
        {
            "merge_method": "della",
            "models": [{"model": "A", "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}],
        },
        "density ± epsilon",
    ),  # fmt: skip
    "dtype": ({"dtype": "int8"}, "dtype: 'int8' must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_mergekit_yaml_mergelab_cannot_reproduce_is_refused(tmp_path, case):
    """Each refusal names the key and what to do (``from_mergekit``, as ``--mergekit``
    calls it)."""
    change, expected = BAD_YAML[case]
    base = {"merge_method": "dare_ties", "base_model": "B0"}
    base["models"] = [{"model": "A", "parameters": {"weight": 1.0, "density": 0.5}}]
    doc = {**base, **change}
    if doc.get("slices"):
        doc.pop("models")
    src = tmp_path / "bad.yml"
    src.write_text(yaml.safe_dump(doc))
    with pytest.raises(MergekitConfigError) as err:
        from_mergekit(src)
    assert expected in str(err.value), str(err.value)
    assert str(src) in str(err.value)


def test_mergekit_yaml_error_through_the_console_script(tmp_path):
    src = tmp_path / "slices.yml"
    src.write_text(yaml.safe_dump({"merge_method": "ties", **BAD_YAML["slices"][0]}))
    proc = run("--mergekit", str(src), str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert "slices: mergelab merges whole checkpoints" in proc.stderr
    proc = run("--mergekit", str(tmp_path / "missing.yml"), str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "cannot read it" in proc.stderr
    assert not (tmp_path / "out").exists()
