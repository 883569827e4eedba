"""The executor's pipeline: slices (``chunked``), per-tensor passes, the reader and drain
threads, the planned shard writer and the allocation policy change no value."""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import harness.stream as stream
from harness.alloc import reuse_freed_memory
from harness.pool import ModelPool, NonFiniteMemberError
from harness.stream import ShardedCheckpointWriter, execute
from methods.base import MergeMethod
from methods.task_arithmetic import TaskArithmetic
from methods.ties import TIES


def open_pool(dirs, **extra) -> ModelPool:
    return ModelPool.from_config(
        {
            "base": {"path": str(dirs["base"])},
            "experts": {"add": {"path": str(dirs["add"])}, "color": {"path": str(dirs["color"])}},
            **extra,
        }
    ).open()


class Sliced(MergeMethod):
    """``inner`` driven in slices, each tensor's per-tensor threshold found in two passes
    over its slices (RadixSelect) instead of ``kthvalue`` over the whole tensor."""

    name = "sliced"
    chunked = True

    def __init__(self, inner: MergeMethod, tensor_passes: int = 0):
        self.inner, self.tensor_passes = inner, tensor_passes
        self.stat_passes = inner.stat_passes
        self.seen: list[tuple[str, int]] = []

    def setup(self, expert_names, seed):
        super().setup(expert_names, seed)
        self.inner.setup(expert_names, seed)

    def observe(self, pass_idx, name, base, experts):
        assert base.dim() == 1
        self.inner.observe(pass_idx, name, base, experts)

    def end_pass(self, pass_idx):
        self.inner.end_pass(pass_idx)

    def observe_tensor(self, pass_idx, name, base, experts):
        self.seen.append((name, pass_idx))

    def merge_tensor(self, name, base, experts):
        assert base.dim() == 1 and base.numel() <= stream.CHUNK
        return self.inner.merge_tensor(name, base, experts)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 18])
def test_slices_give_the_whole_tensor_merge_bit_for_bit(tiny_pool, monkeypatch, chunk):
    """Task arithmetic and global TIES (both entrywise once the global thresholds are
    known) merged in slices of an odd size equal the whole-tensor merge."""
    pool = open_pool(tiny_pool, dtype="bfloat16")
    whole_ta = execute(pool, TaskArithmetic(scaling=0.3), lambda *_: None, seed=0)
    whole_ties = execute(pool, TIES(density=0.3), lambda *_: None, seed=0)
    monkeypatch.setattr(stream, "CHUNK", chunk)
    sliced = Sliced(TaskArithmetic(scaling=0.3), tensor_passes=2)
    assert execute(pool, sliced, lambda *_: None, seed=0) == whole_ta
    names = [n for n in pool.tensor_names() if pool.is_merged(n)]
    assert set(sliced.seen) == {(n, p) for n in names for p in (0, 1)}
    assert execute(pool, Sliced(TIES(density=0.3)), lambda *_: None, seed=0) == whole_ties


def test_a_nan_in_a_slice_names_the_whole_tensors_count(tiny_pool, tmp_path, monkeypatch):
    name = "model.layers.0.mlp.up_proj.weight"
    shutil.copytree(tiny_pool["add"], tmp_path / "bad")
    state = load_file(tmp_path / "bad" / "model.safetensors")
    state[name][0, :3] = float("nan")
    state[name][-1, -1] = float("inf")
    save_file(state, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    pool = ModelPool.from_config(
        {
            "base": {"path": str(tiny_pool["base"])},
            "experts": {"add": {"path": str(tmp_path / "bad")}},
        }
    ).open()
    monkeypatch.setattr(stream, "CHUNK", 16)
    with pytest.raises(
        NonFiniteMemberError, match=rf"'add' holds NaN/inf in tensor '{name}': 4 of"
    ):
        execute(pool, Sliced(TaskArithmetic()), lambda *_: None, seed=0)


class Failing(TaskArithmetic):
    def merge_tensor(self, name, base, experts):
        if len(self.done) == 3:
            raise RuntimeError("boom")
        self.done.append(name)
        return super().merge_tensor(name, base, experts)


@pytest.mark.parametrize("where", ["method", "sink"])
def test_a_failure_mid_merge_stops_the_reader_and_drain_threads(tiny_pool, where):
    pool = open_pool(tiny_pool)
    m = Failing() if where == "method" else TaskArithmetic()
    m.done = []

    def sink(name, t):
        if where == "sink" and name == pool.tensor_names()[2]:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        execute(pool, m, sink, seed=0, progress=False)
    assert gc.isenabled()


def test_planned_writer_shards_like_the_buffered_rule_and_loads(tiny_pool, tmp_path):
    """A new shard starts when the next tensor would pass max_shard_size; each file is a
    valid safetensors file holding exactly its index entries, in arrival order."""
    pool = open_pool(tiny_pool)
    mem: dict[str, torch.Tensor] = {}
    execute(pool, TaskArithmetic(), mem.__setitem__, seed=0)
    writer = ShardedCheckpointWriter(tmp_path / "m", max_shard_size="20KB")
    writer.write_all(mem)
    out = writer.close(pool, "card")
    expected, size = [[]], 0
    for k, v in mem.items():
        n = v.numel() * v.element_size()
        if expected[-1] and size + n > 20 << 10:
            expected.append([])
            size = 0
        expected[-1].append(k)
        size += n
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert [[k for k in mem if index[k] == f] for f in files] == expected
    for f in files:
        with safe_open(out / f, "pt") as fh:
            assert list(fh.keys()) == sorted(k for k in mem if index[k] == f)
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                assert torch.equal(fh.get_tensor(k), mem[k])


def test_writer_refuses_what_its_plan_does_not_hold(tmp_path):
    writer = ShardedCheckpointWriter(tmp_path / "m")
    with pytest.raises(RuntimeError, match="call plan"):
        writer("a", torch.zeros(2))
    writer.plan([("a", torch.float32, (2,))])
    with pytest.raises(ValueError, match=r"expected \('a', torch.float32, \(2,\)\) next"):
        writer("a", torch.zeros(3))


def test_reuse_freed_memory_restores_the_collector():
    gc.enable()
    with reuse_freed_memory():
        assert not gc.isenabled()
        torch.empty(64 << 20).fill_(1)
    assert gc.isenabled()
    gc.disable()
    with reuse_freed_memory():
        pass
    assert not gc.isenabled()
    gc.enable()


def test_the_model_card_carries_the_mergekit_yaml_where_one_exists():
    """Task arithmetic has a mergekit counterpart; the paper's global TIES trim has none."""
    from omegaconf import OmegaConf

    from harness.stream import mergekit_equivalent, model_card
    from tests.helpers.hydra_conf import compose

    def card(*overrides: str) -> str:
        c = OmegaConf.to_container(compose(*overrides), resolve=True)
        record = {"cell_id": "c1", "method": {}, "pool": {}, "seed": 0, "config": c}
        return model_card(record, *mergekit_equivalent(record, {"base": "/m/base"}))

    ta = card("method=task_arithmetic")
    assert "## The same merge with mergekit 0.1.5" in ta and "merge_method: task_arithmetic" in ta
    ties = card("method=ties")
    assert "No mergekit 0.1.5 configuration computes this merge" in ties
    assert "merge_method" not in ties
