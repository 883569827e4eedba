"""Bad inputs a user can hand mergelab, each expected to fail with an error that names the
member, file or option and says the fix.

Every case breaks one thing about the tiny pool (tests/helpers/tiny_pool.py) or the
config, triggers it the way a run meets it (``ModelPool.from_config`` / ``open`` /
``check_compatible``, the method's instantiation, ``run_cell``, or the ``mergelab``
console script in-process), and asserts that the error (a) was raised by mergelab's own
code (or is one of Hydra's config errors, which Hydra prints without a traceback), not a
raw third-party traceback, (b) names what is wrong and (c) says how to fix it. Cases whose
error is still unclear because the fix belongs to a file outside the pool and the CLI are
strict xfails naming that file: fixing it turns them into failures until the mark goes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from harness.pool import ModelPool, PoolError
from tests.helpers.hydra_conf import compose
from tests.helpers.tiny_pool import reshard

ROOT = Path(__file__).resolve().parents[2]
Dirs = dict[str, Path]


class Case(NamedTuple):
    trigger: Callable[[Dirs, Path], object]  # raises the error under test
    names: str  # regex: the member, file or option at fault
    fix: str  # regex: the remedy the message gives


# --------------------------------------------------------------------------- builders


def _cfg(dirs: Dirs, **experts: dict) -> dict:
    experts = experts or {name: {"path": str(dirs[name])} for name in ("add", "color")}
    return {"name": "t", "base": {"path": str(dirs["base"])}, "experts": experts}


def _from(**overrides: object) -> Callable[[Dirs, Path], object]:
    """Trigger: ``ModelPool.from_config`` over the tiny pool's config with ``overrides``."""
    return lambda dirs, _tmp: ModelPool.from_config({**_cfg(dirs), **overrides})


def _pool(dirs: Dirs, **members: dict) -> ModelPool:
    """Open and check the pool, as a run does before merging."""
    pool = ModelPool.from_config(_cfg(dirs, **members)).open()
    pool.check_compatible()
    return pool


def _copy(dirs: Dirs, tmp: Path, member: str = "add") -> Path:
    dst = tmp / "bad"
    shutil.copytree(dirs[member], dst)
    return dst


def _broken(edit: Callable[[Path], object], member: str = "add") -> Callable[[Dirs, Path], object]:
    """Trigger: the tiny pool, opened and checked, with a copy of ``member`` changed by
    ``edit(dir)`` in it: an expert as expert 'bad', the base as the base, the LoRA adapter
    as expert 'lora'."""

    def trigger(dirs: Dirs, tmp: Path) -> ModelPool:
        copy = _copy(dirs, tmp, member)
        edit(copy)
        if member == "base":
            return _pool({**dirs, "base": copy})
        if member == "lora_color":
            return _pool(dirs, lora={"adapter": str(copy)})
        return _pool(dirs, bad={"path": str(copy)})

    return trigger


def _edit_state(
    edit: Callable[[dict[str, torch.Tensor]], object], fname: str = "model.safetensors"
) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        state = load_file(d / fname)
        edit(state)
        save_file(state, d / fname, metadata={"format": "pt"})

    return apply


def _edit_json(fname: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = json.loads((d / fname).read_text())
        edit(data)
        (d / fname).write_text(json.dumps(data))

    return apply


def _truncate(fname: str, keep: int) -> Callable[[Path], None]:
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``)."""
    return lambda d: (d / fname).write_bytes((d / fname).read_bytes()[:keep])


def _as_bin(state_of: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    """Replace the safetensors weights by a pytorch_model.bin holding ``state_of(state)``."""

    def apply(d: Path) -> None:
        state = load_file(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        torch.save(state_of(state), d / "pytorch_model.bin")

    return apply


class _Pickled:
    """An object a weights-only unpickler must refuse."""


def _swap_ids(tok: dict) -> None:
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]


def _rename_token(tok: dict) -> None:
    vocab = tok["model"]["vocab"]
    vocab["zz"] = vocab.pop("z")


def _lora_key(state: dict[str, torch.Tensor], part: str) -> str:
    return next(k for k in sorted(state) if f".{part}." in k)


def _widen_lora_a(state: dict[str, torch.Tensor]) -> None:
    key = _lora_key(state, "lora_A")
    state[key] = torch.cat([state[key], state[key][:, :3]], dim=1)


def _retarget_lora(state: dict[str, torch.Tensor]) -> None:
    for part in ("lora_A", "lora_B"):
        key = _lora_key(state, part)
        state[key.replace("layers.0.", "layers.7.")] = state.pop(key)


def _run(*overrides: str) -> Callable[[Dirs, Path], object]:
    """Trigger: ``run_cell`` on the tiny pool and task with ``overrides`` (W&B off)."""

    def trigger(dirs: Dirs, tmp: Path) -> object:
        from harness.run import run_cell

        cfg = compose(
            "logger.mode=disabled",
            f"runs_dir={tmp / 'runs'}",
            "task.tasks=[tiny_add]",
            f"task.include_path={dirs['tasks']}",
            *overrides,  # later overrides win
        )
        cfg.model = OmegaConf.create({**_cfg(dirs), "dtype": None, "exclude": []})
        return run_cell(cfg)

    return trigger


def _method(*overrides: str) -> Callable[[Dirs, Path], object]:
    """Trigger: instantiate the composed method config, as a run does before the pool."""
    from harness.checks import build_method

    return lambda _dirs, _tmp: build_method(compose(*overrides).method)


def _cli(*argv: str) -> Callable[[Dirs, Path], object]:
    """Trigger: the ``mergelab`` console script in-process (``HYDRA_FULL_ERROR=1`` makes
    Hydra re-raise the error it would print)."""

    def trigger(_dirs: Dirs, tmp: Path) -> None:
        from harness.cli import main

        args = ["mergelab", *argv, "dry_run=true", f"runs_dir={tmp / 'runs'}"]
        with (
            mock.patch.object(sys, "argv", args),
            mock.patch.dict(os.environ, {"HYDRA_FULL_ERROR": "1"}),
        ):
            main()

    return trigger


def _in_the_way(dirs: Dirs, tmp: Path) -> object:
    (tmp / "file").write_text("")  # runs_dir below a file: nothing can be written there
    return _run(f"runs_dir={tmp / 'file' / 'runs'}")(dirs, tmp)


def _drop_tokenizer(d: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()


REFETCH = r"re-download .*or rebuild it"
MEMBER = r"pool member 'bad' \(.*bad\)"
BASE = r"pool member 'base' \(.*bad\)"
ADAPTER = r"pool member 'lora' \(.*bad\)"

CASES: dict[str, Case] = {
    # -------------------------------------------------------------- pool config
    "base path missing": Case(_from(base={}), r"model\.base\.path", r"model\.base\.path=DIR"),
    "base given as a string": Case(
        _from(base="/x"), r"model\.base\.path", r"model\.base\.path=DIR"
    ),
    "experts given as a list": Case(
        _from(experts=["a", "b"]), r"model\.experts=\['a', 'b'\]", r"experts\.<name>\.path=DIR"
    ),
    "expert given as a string": Case(
        _from(experts={"a": "/x"}), r"model\.experts\.a ", r"model\.experts\.a\.path=DIR"
    ),
    "expert with path and adapter": Case(
        _from(experts={"a": {"path": "x", "adapter": "y"}}),
        r"model\.experts\.a needs exactly one",
        r"model\.experts\.a\.adapter=PEFT_DIR",
    ),
    "expert with neither path nor adapter": Case(
        _from(experts={"a": {"tasks": ["t"]}}),
        r"model\.experts\.a needs exactly one",
        r"model\.experts\.a\.path=DIR",
    ),
    "expert named base": Case(
        _from(experts={"base": {"path": "x"}}), r"named 'base'", r"rename it in model\.experts"
    ),
    "expert tasks given as a string": Case(
        _from(experts={"a": {"path": "x", "tasks": "tiny_add"}}),
        r"model\.experts\.a\.tasks='tiny_add'",
        r"model\.experts\.a\.tasks=\[tiny_add\]",
    ),
    "no experts for a merging method": Case(
        _from(experts={}), r"model\.experts is empty", r"model\.experts\.<name>\.path=DIR"
    ),
    "invalid exclude regex": Case(
        _from(exclude=["embed_tokens", "layers.[0"]),
        r"model\.exclude\[1\]='layers\.\[0' is not a valid regex",
        r"escaping characters meant literally with a backslash",
    ),
    "exclude given as a string": Case(
        _from(exclude="embed_tokens"),
        r"model\.exclude='embed_tokens' must be a list",
        r"model\.exclude=\[embed_tokens\]",
    ),
    "bad dtype string": Case(_from(dtype="fp8"), r"model\.dtype='fp8'", r"use one of \["),
    "model.experts={} on the command line": Case(
        _cli("model.experts={}"),
        r"model\.experts=\{\} does not empty the pool",
        r"~model\.experts;.*~model\.experts\.math .* keeps knowledge",
    ),
    # -------------------------------------------------------------- member paths and files
    "member path missing": Case(
        lambda dirs, tmp: _pool(dirs, bad={"path": str(tmp / "nope")}),
        r"model\.experts\.bad\.path='.*nope' is not a directory \(nothing",
        r"point it at a local checkpoint directory",
    ),
    "member path is a file": Case(
        lambda dirs, tmp: _pool(dirs, bad={"path": str(dirs["add"] / "config.json")}),
        r"model\.experts\.bad\.path='.*config\.json' is not a directory \(a file",
        r"point it at a local checkpoint directory",
    ),
    "base path missing on disk": Case(
        lambda dirs, tmp: _pool({**dirs, "base": tmp / "nope"}),
        r"model\.base\.path='.*nope'",
        r"point it at a local checkpoint directory",
    ),
    "missing config.json": Case(
        _broken(lambda d: (d / "config.json").unlink()),
        rf"{MEMBER} has no config\.json",
        r"save_pretrained",
    ),
    "torn config.json": Case(
        _broken(_truncate("config.json", 20)), rf"{MEMBER}.*config\.json", REFETCH
    ),
    "no weights in the directory": Case(
        _broken(lambda d: (d / "model.safetensors").unlink()),
        rf"{MEMBER} has no weights",
        r"point the member at a complete checkpoint",
    ),
    "truncated safetensors (expert)": Case(
        _broken(_truncate("model.safetensors", -1000)),
        rf"{MEMBER}: cannot read .*bad/model\.safetensors .*incomplete metadata",
        REFETCH,
    ),
    "truncated safetensors header (base)": Case(
        _broken(_truncate("model.safetensors", 200), "base"),
        rf"{BASE}: cannot read .*bad/model\.safetensors",
        REFETCH,
    ),
    "corrupted safetensors header": Case(
        _broken(
            lambda d: (d / "model.safetensors").write_bytes(
                (b := (d / "model.safetensors").read_bytes())[:8] + b"\xff" * 32 + b[40:]
            )
        ),
        rf"{MEMBER}: cannot read .*model\.safetensors",
        REFETCH,
    ),
    "zero-byte safetensors": Case(
        _broken(_truncate("model.safetensors", 0)),
        rf"{MEMBER}: cannot read .*model\.safetensors",
        REFETCH,
    ),
    "safetensors with no tensors": Case(
        _broken(lambda d: save_file({}, d / "model.safetensors")),
        rf"{MEMBER}: its weights hold no tensors",
        REFETCH,
    ),
    "index pointing to a missing shard": Case(
        _broken(lambda d: (reshard(d), (d / "b.safetensors").unlink())),
        rf"{MEMBER}: .*index\.json lists shards that are missing: \[.*b\.safetensors\]",
        r"re-download the missing shards",
    ),
    "zero-byte shard": Case(
        _broken(lambda d: (reshard(d), _truncate("a.safetensors", 0)(d))),
        rf"{MEMBER}: cannot read .*a\.safetensors",
        REFETCH,
    ),
    "corrupted index JSON": Case(
        _broken(lambda d: (reshard(d), _truncate("model.safetensors.index.json", 15)(d))),
        rf"{MEMBER}: cannot read .*index\.json",
        REFETCH,
    ),
    "index naming the wrong shard": Case(
        _broken(
            lambda d: (
                reshard(d),
                _edit_json(
                    "model.safetensors.index.json",
                    lambda i: i["weight_map"].update({"lm_head.weight": "b.safetensors"}),
                )(d),
            )
        ),
        rf"{MEMBER}: .*maps \[lm_head\.weight\] .*b\.safetensors, which does not hold them",
        REFETCH,
    ),
    "truncated pytorch_model.bin": Case(
        _broken(lambda d: (_as_bin(dict)(d), _truncate("pytorch_model.bin", 5000)(d))),
        rf"{MEMBER}: cannot read .*pytorch_model\.bin",
        REFETCH,
    ),
    "pickle .bin refused by weights_only": Case(
        _broken(_as_bin(lambda s: {**s, "extra": _Pickled()})),
        rf"{MEMBER}: .*bad/pytorch_model\.bin was refused by torch\.load\(weights_only=True\) "
        r"\(Unsupported global",
        r"convert it once to safetensors .*'model\.safetensors'",
    ),
    # -------------------------------------------------------------- compatibility
    "mismatched architecture": Case(
        _broken(_edit_json("config.json", lambda c: c.update(model_type="mistral"))),
        r"expert 'bad' has model_type='mistral' but the base has 'llama'",
        r"set model\.experts\.bad\.path to one",
    ),
    "mismatched shapes": Case(
        _broken(
            _edit_state(lambda s: s.update({"lm_head.weight": s["lm_head.weight"][:, :-1].clone()}))
        ),
        r"expert 'bad' does not match the base: .*lm_head\.weight: base \(101, 32\) vs \(101, 31\)",
        r"Experts must be fine-tunes of the base",
    ),
    "missing tensor": Case(
        _broken(_edit_state(lambda s: s.pop("model.layers.1.mlp.down_proj.weight"))),
        r"expert 'bad' .*missing \[model\.layers\.1\.mlp\.down_proj\.weight\]",
        r"list the others in model\.exclude",
    ),
    "extra tensor": Case(
        _broken(_edit_state(lambda s: s.update(extra=torch.zeros(2)))),
        r"expert 'bad' .*extra \[extra\]",
        r"list the others in model\.exclude",
    ),
    "vocab size mismatch": Case(
        _broken(_edit_json("config.json", lambda c: c.update(vocab_size=104))),
        r"expert 'bad' does not match the base: vocab_size 101 vs 104",
        r"model\.exclude=\['embed_tokens','lm_head'\]",
    ),
    "swapped token ids": Case(
        _broken(_edit_json("tokenizer.json", _swap_ids)),
        r"expert 'bad' .*tokens with other ids \['a' base id \d+ vs \d+, 'b' base id",
        r"fine-tuned from the base's tokenizer",
    ),
    "renamed token": Case(
        _broken(_edit_json("tokenizer.json", _rename_token)),
        r"expert 'bad' .*tokens in only one of them \[z, zz\]",
        r"model\.exclude=\['embed_tokens','lm_head'\]",
    ),
    "different eos token": Case(
        _broken(_edit_json("tokenizer_config.json", lambda t: t.update(eos_token="<unk>"))),
        r"expert 'bad' has other special tokens .*eos base '</s>' \(id 2\) vs '<unk>' \(id 3\)",
        r"fine-tuned with the base's special tokens",
    ),
    "different pad token": Case(
        _broken(_edit_json("tokenizer_config.json", lambda t: t.update(pad_token="<unk>"))),
        r"expert 'bad' has other special tokens .*pad base '<pad>' \(id 0\) vs '<unk>' \(id 3\)",
        r"fine-tuned with the base's special tokens",
    ),
    "torn expert tokenizer": Case(
        _broken(_truncate("tokenizer.json", 30)),
        rf"{MEMBER}: cannot load its tokenizer",
        r"Re-download or re-save it",
    ),
    "base without tokenizer files": Case(
        _broken(_drop_tokenizer, "base"),
        rf"{BASE} has no tokenizer",
        r"copy the tokenizer the base",
    ),
    # -------------------------------------------------------------- LoRA adapters
    "adapter without adapter_config.json": Case(
        _broken(lambda d: (d / "adapter_config.json").unlink(), "lora_color"),
        rf"{ADAPTER} has no adapter_config\.json",
        r"the directory peft's save_pretrained wrote",
    ),
    "torn adapter_config.json": Case(
        _broken(_truncate("adapter_config.json", 10), "lora_color"),
        rf"{ADAPTER}: cannot read .*adapter_config\.json",
        REFETCH,
    ),
    "adapter config without r": Case(
        _broken(_edit_json("adapter_config.json", lambda c: c.pop("r")), "lora_color"),
        rf"{ADAPTER}: adapter .*adapter_config\.json has no positive r \(r=None\)",
        r"Re-save the adapter",
    ),
    "unsupported adapter feature": Case(
        _broken(_edit_json("adapter_config.json", lambda c: c.update(use_dora=True)), "lora_color"),
        rf"{ADAPTER}: adapter .* uses LORA \['use_dora'\]",
        r"merge_and_unload\(\)",
    ),
    "adapter without weights": Case(
        _broken(lambda d: (d / "adapter_model.safetensors").unlink(), "lora_color"),
        rf"{ADAPTER} has no adapter_model\.safetensors",
        r"copy the adapter's weights",
    ),
    "truncated adapter weights": Case(
        _broken(_truncate("adapter_model.safetensors", -100), "lora_color"),
        rf"{ADAPTER}: cannot read .*adapter_model\.safetensors",
        REFETCH,
    ),
    "adapter for another base (module it lacks)": Case(
        _broken(_edit_state(_retarget_lora, "adapter_model.safetensors"), "lora_color"),
        rf"{ADAPTER}: adapter .* targets 'model\.layers\.7\.",
        r"List the adapter over the base it was trained on",
    ),
    "adapter for another base (shapes)": Case(
        _broken(_edit_state(_widen_lora_a, "adapter_model.safetensors"), "lora_color"),
        rf"{ADAPTER}: adapter .* does not fit the base's shapes .*base \(32, 32\) vs adapter",
        r"List the adapter over the base it was trained on",
    ),
    # -------------------------------------------------------------- methods, tasks, run
    "unknown method name": Case(
        lambda _d, _t: compose("method=nope"),
        r"Could not find 'method/nope'",
        r"Available options in 'method'",
    ),
    "unknown task config": Case(
        lambda _d, _t: compose("task=nope"),
        r"Could not find 'task/nope'",
        r"Available options in 'task'",
    ),
    "misspelt method option": Case(
        _method("method.scalingg=0.3"),
        r"Could not override 'method\.scalingg'",
        r"use \+method\.scalingg",
    ),
    "method option out of range": Case(
        _method("method=ties", "method.density=2"),
        r"method\.density must be in \(0, 1\], got 2",
        r"must be in",
    ),
    "method option of the wrong type": Case(
        _method("method.scaling=abc"),
        r"method\.scaling must be a finite number, got 'abc'",
        r"must be a finite number",
    ),
    "unknown lm-eval task": Case(
        _run("task.tasks=[tiny_addd]"), r"'tiny_addd'; close matches: .*tiny_add", r"Fix: "
    ),
    "unknown method option": Case(
        _method("+method.scalingg=0.3"),
        r"scalingg",
        r"options are",
    ),
    "seed of the wrong type": Case(
        _run("seed=abc"), r"seed", r"seed=\d"
    ),
    "negative threads": Case(
        _run("threads=-2"), r"threads=-2", r"threads=N"
    ),
    "unknown device": Case(_run("device=gpu"), r"device='gpu'", r"cuda"),
    "runs_dir not writable": Case(
        _in_the_way, r"runs_dir=", r"writable directory"
    ),
    "bad max_shard_size": Case(
        _run("stream=true", "max_shard_size=lots"),
        r"max_shard_size='lots'",
        r"1GB",
    ),
}


def _raised_by_mergelab(err: BaseException) -> bool:
    """The innermost frame that raised ``err`` is in this repository, not a package."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve() if tb else Path("/")
    return ROOT in path.parents and ".venv" not in path.parts


def _clear_type(err: BaseException) -> bool:
    if isinstance(err, ConfigCompositionException | MissingConfigException):
        return True  # Hydra's own config errors: printed as one message, no traceback
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__  # Hydra quotes the method's own error
    return _raised_by_mergelab(err)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=name) for name, c in CASES.items()],
)
def test_bad_input_names_the_problem_and_the_fix(case: Case, tiny_pool: Dirs, tmp_path: Path):
    with pytest.raises(Exception) as info:  # noqa: PT011 - which type is what is checked
        case.trigger(tiny_pool, tmp_path)
    err, msg = info.value, str(info.value)
    assert _clear_type(err), f"{type(err).__module__}.{type(err).__name__}: {msg}"
    assert re.search(case.names, msg, re.S), msg
    assert re.search(case.fix, msg, re.S), msg


def test_legacy_bin_checkpoint_is_read(tiny_pool, tmp_path):
    """A pytorch_model.bin in torch's pre-zip format cannot be memory-mapped; it is read
    whole rather than refused as broken."""
    bad = _copy(tiny_pool, tmp_path)
    state = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    pool = _pool(tiny_pool, bad={"path": str(bad)})
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(pool.tensor("bad", name), state[name])


def test_a_pad_token_only_one_side_defines_is_accepted(tiny_pool, tmp_path):
    """Fine-tunes often add a pad token to a base without one: no weight changes, no error."""
    bad = _copy(tiny_pool, tmp_path)
    _edit_json("tokenizer_config.json", lambda t: t.update(pad_token=None))(bad)
    pool = _pool(tiny_pool, bad={"path": str(bad)})
    assert pool.tokenizer("bad").pad_token is None and pool.tokenizer().pad_token == "<pad>"


def test_special_tokens_are_checked_even_when_embeddings_are_kept(tiny_pool, tmp_path):
    """model.exclude of the embeddings skips the vocabulary check (the documented fix for a
    different vocabulary), not the special tokens: the merged model still stops on the
    base's eos."""
    bad = _copy(tiny_pool, tmp_path)
    _edit_json("tokenizer.json", _rename_token)(bad)
    cfg = {**_cfg(tiny_pool, bad={"path": str(bad)}), "exclude": ["embed_tokens", "lm_head"]}
    ModelPool.from_config(cfg).open().check_compatible()
    _edit_json("tokenizer_config.json", lambda t: t.update(eos_token="<unk>"))(bad)
    with pytest.raises(PoolError, match=r"other special tokens .*eos base '</s>'"):
        ModelPool.from_config(cfg).open().check_compatible()
