"""The streaming executor, the sharded writer and the record helpers."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import records
from harness.pool import ModelPool, NonFiniteMemberError
from harness.stream import NonFiniteError, ShardedCheckpointWriter, execute, parse_size
from methods.task_arithmetic import TaskArithmetic
from methods.ties import TIES


def open_pool(dirs, **extra) -> ModelPool:
    return ModelPool.from_config(
        {
            "name": "t",
            "base": {"path": str(dirs["base"])},
            "experts": {"add": {"path": str(dirs["add"])}, "color": {"path": str(dirs["color"])}},
            **extra,
        }
    ).open()


def test_execute_matches_whole_model_math_and_is_deterministic(tiny_pool):
    pool = open_pool(tiny_pool)
    out: dict[str, torch.Tensor] = {}
    digest = execute(pool, TaskArithmetic(scaling=0.5), out.__setitem__, seed=0, progress=False)
    base, add, color = (
        load_file(tiny_pool[k] / "model.safetensors") for k in ("base", "add", "color")
    )
    assert list(out) == pool.tensor_names()
    for k, v in out.items():
        torch.testing.assert_close(v, base[k] + 0.5 * ((add[k] - base[k]) + (color[k] - base[k])))
    again: dict[str, torch.Tensor] = {}
    assert (
        execute(pool, TaskArithmetic(scaling=0.5), again.__setitem__, seed=0, progress=False)
        == digest
    )
    other: dict[str, torch.Tensor] = {}
    assert (
        execute(pool, TaskArithmetic(scaling=0.3), other.__setitem__, seed=0, progress=False)
        != digest
    )


def test_excluded_tensors_come_from_base_and_dtype_casts(tiny_pool):
    pool = open_pool(tiny_pool, exclude=["embed_tokens"], dtype="bfloat16")
    out: dict[str, torch.Tensor] = {}
    execute(pool, TaskArithmetic(scaling=1.0), out.__setitem__, seed=0, progress=False)
    base = load_file(tiny_pool["base"] / "model.safetensors")
    assert torch.equal(
        out["model.embed_tokens.weight"], base["model.embed_tokens.weight"].bfloat16()
    )
    assert all(v.dtype == torch.bfloat16 for v in out.values())


def _with_nan(src, dst, name: str):
    """A copy of checkpoint ``src`` at ``dst`` with one NaN in tensor ``name``."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state[name][0, 0] = float("nan")
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def spying(cls: type) -> type:
    """``cls`` recording the name of every tensor it is handed."""

    class Spy(cls):
        def observe(self, pass_idx, name, base, experts):
            self.seen.append(name)
            super().observe(pass_idx, name, base, experts)

        def merge_tensor(self, name, base, experts):
            self.seen.append(name)
            return super().merge_tensor(name, base, experts)

    return Spy


@pytest.mark.parametrize("method", [TaskArithmetic, TIES], ids=["task_arithmetic", "ties"])
def test_nan_member_fails_before_the_method_sees_it(tiny_pool, tmp_path, method):
    """TIES would trim the NaN away (it masks entries): the read check comes first."""
    name = "model.layers.0.mlp.up_proj.weight"
    bad = _with_nan(tiny_pool["add"], tmp_path / "bad", name)
    pool = ModelPool.from_config(
        {"base": {"path": str(tiny_pool["base"])}, "experts": {"add": {"path": str(bad)}}}
    ).open()
    m = spying(method)()
    m.seen = []
    with pytest.raises(NonFiniteMemberError) as info:
        execute(pool, m, lambda *_: None, seed=0, progress=False)
    msg = str(info.value)
    assert f"pool member 'add' holds NaN/inf in tensor '{name}'" in msg
    assert str(bad / "model.safetensors") in msg and "re-download or rebuild" in msg
    assert m.seen and name not in m.seen  # the method ran on the tensors before it


def test_nan_in_a_tensor_kept_from_the_base_is_caught(tiny_pool, tmp_path):
    bad = _with_nan(tiny_pool["base"], tmp_path / "base", "model.embed_tokens.weight")
    cfg = {
        "base": {"path": str(bad)},
        "experts": {"add": {"path": str(tiny_pool["add"])}},
        "exclude": ["embed_tokens"],
    }
    pool = ModelPool.from_config(cfg).open()
    with pytest.raises(NonFiniteMemberError, match=r"'base' .*'model\.embed_tokens\.weight'"):
        execute(pool, TaskArithmetic(), lambda *_: None, seed=0, progress=False)


def test_non_finite_merge_of_finite_members_blames_the_hyperparameters(tiny_pool):
    pool = open_pool(tiny_pool)
    with pytest.raises(NonFiniteError) as info:
        execute(pool, TaskArithmetic(scaling=1e39), lambda *_: None, seed=0, progress=False)
    assert not isinstance(info.value, NonFiniteMemberError)
    assert "task_arithmetic produced NaN/inf in tensor" in str(info.value)
    assert "from finite members" in str(info.value) and "hyperparameters" in str(info.value)


def test_sharded_writer_roundtrips_through_from_pretrained(tiny_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    pool = open_pool(tiny_pool)
    writer = ShardedCheckpointWriter(tmp_path / "merged", max_shard_size="16KB")
    mem: dict[str, torch.Tensor] = {}

    def both(name, t):
        mem[name] = t
        writer(name, t)

    execute(pool, TaskArithmetic(scaling=0.3), both, seed=0, progress=False)
    assert (tmp_path / "merged.partial").is_dir() and not (tmp_path / "merged").exists()
    out = writer.close(pool, "# card\n")
    assert not (tmp_path / "merged.partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(mem) and len(set(index["weight_map"].values())) > 2
    assert (out / "tokenizer.json").is_file() and (out / "README.md").read_text() == "# card\n"
    model = AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, mem[k]), k


def test_parse_size():
    assert parse_size("2GB") == 2 << 30 and parse_size("16KB") == 16384 and parse_size(10) == 10


def test_cell_id_depends_only_on_result_deciding_keys():
    cfg = {
        "method": {"_target_": "m.X", "a": 1},
        "model": {"name": "p"},
        "task": {"tasks": ["t"]},
        "eval": {"limit": None},
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "runs_dir": "a",
        "logger": {"mode": "offline"},
    }
    cid = records.cell_id(cfg)
    assert records.cell_id({**cfg, "runs_dir": "b", "logger": {"mode": "online"}}) == cid
    assert records.cell_id({**cfg, "seed": 1}) != cid
    assert records.cell_id({**cfg, "threads": 2}) != cid  # float reductions depend on it
    assert records.cell_id({**cfg, "method": {"_target_": "m.X", "a": 2}}) != cid
    with pytest.raises(ValueError, match="config lacks"):
        records.cell_id({"method": {}})


def test_only_complete_records_count_as_finished(tmp_path):
    assert records.load_finished(tmp_path, "abc") is None
    path = records.result_path(tmp_path, "abc")
    path.parent.mkdir()
    path.write_text('{"status": "compl')  # torn write from a crash
    assert records.load_finished(tmp_path, "abc") is None
    records.write_json_atomic(path, {"status": "running"})
    assert records.load_finished(tmp_path, "abc") is None
    records.write_json_atomic(path, {"status": "failed", "error": {"type": "E", "message": ""}})
    assert records.load_finished(tmp_path, "abc") is None
    records.write_json_atomic(path, {"status": "complete", "x": 1})
    assert records.load_finished(tmp_path, "abc") == {"status": "complete", "x": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temp files left


def test_environment_records_threads_machine_and_every_package():
    from importlib import metadata

    env = records.environment()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["packages"]["pytest"] == metadata.version("pytest")
    lines = "\n".join(sorted(f"{n}=={v}" for n, v in env["packages"].items()))
    assert env["packages_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert records.SCHEMA == 2
