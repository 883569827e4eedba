"""The streaming executor, the sharded writer and the record helpers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from harness import records
from harness.pool import ModelPool
from harness.stream import NonFiniteError, ShardedCheckpointWriter, execute, parse_size
from methods.task_arithmetic import TaskArithmetic


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


def test_nan_is_reported_with_tensor_and_member(tiny_pool, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_pool["add"], bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    pool = ModelPool.from_config(
        {"base": {"path": str(tiny_pool["base"])}, "experts": {"add": {"path": str(bad)}}}
    ).open()
    with pytest.raises(
        NonFiniteError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*\['add'\]"
    ):
        execute(pool, TaskArithmetic(), lambda *_: None, seed=0, progress=False)


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
        "runs_dir": "a",
        "logger": {"mode": "offline"},
    }
    cid = records.cell_id(cfg)
    assert records.cell_id({**cfg, "runs_dir": "b", "logger": {"mode": "online"}}) == cid
    assert records.cell_id({**cfg, "seed": 1}) != cid
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
    records.write_json_atomic(path, {"status": "complete", "x": 1})
    assert records.load_finished(tmp_path, "abc") == {"status": "complete", "x": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temp files left
