"""The streaming executor, the sharded writer and the record helpers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time

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
    digest = execute(pool, TaskArithmetic(scaling=0.3), writer, seed=0, progress=False)
    assert execute(pool, TaskArithmetic(scaling=0.3), mem.__setitem__, seed=0) == digest
    (partial,) = tmp_path.iterdir()  # this writer's own partial directory
    assert partial.name.startswith(f"merged.partial-{socket.gethostname()}-{os.getpid()}-")
    assert writer.close(pool, "# card\n") == partial and not (tmp_path / "merged").exists()
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.bin").write_bytes(b"old")
    out = writer.swap_in()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and not (out / "stale.bin").exists()
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


def claim(tmp_path, **kw) -> records.CellClaim:
    return records.CellClaim(tmp_path, "abc", **{"heartbeat": 0.05, "timeout": 60, **kw})


def eventually(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition`` until true or ``timeout`` s passed (threads on loaded cores)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def freeze(c: records.CellClaim) -> None:
    """Pause the holder's heartbeat, as a stopped or swapped-out process would."""
    c._stop.set()
    c._beat.join()


def resume(c: records.CellClaim) -> None:
    c._stop.clear()
    c._hold()


def token(path) -> str:
    return json.loads(path.read_text())["token"]


def test_a_claim_is_exclusive_beats_and_is_waited_for_until_done(tmp_path, capsys):
    first, second = claim(tmp_path), claim(tmp_path)
    assert first.acquire(lambda: False)
    held = json.loads(first.path.read_text())
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    assert eventually(lambda: json.loads(first.path.read_text())["heartbeat"] > held["heartbeat"])
    done = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(second.acquire(done.is_set)))
    waiter.start()
    printed: list[str] = []
    assert eventually(
        lambda: (
            printed.append(capsys.readouterr().out) or "wait abc: claimed by" in "".join(printed)
        )
    )
    assert waiter.is_alive()
    done.set()  # the owner finished the cell: the waiter gives up without claiming
    waiter.join(10)
    assert got == [False] and first.path.is_file()
    first.check()
    first.release()
    assert not first.path.exists() and list(tmp_path.joinpath(".claims").iterdir()) == []


def test_a_stale_claim_is_taken_over(tmp_path, capsys):
    me = claim(tmp_path).owner
    no_pid = int(open("/proc/sys/kernel/pid_max").read()) + 1  # no process can have it
    path = tmp_path / ".claims" / "abc.json"
    path.parent.mkdir()
    for held, why in (
        ({**me, "pid": no_pid, "token": "x", "heartbeat": time.time()}, "its process is gone"),
        (
            {**me, "pid_start": "1", "token": "x", "heartbeat": time.time()},
            "its process is gone (pid reused)",
        ),
        ({**me, "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 61}, "no heartbeat"),
    ):
        path.write_text(json.dumps(held))
        taker = claim(tmp_path)
        assert taker.acquire(lambda: False)
        assert f"take over abc: the claim of {held['host']} pid {held['pid']} is stale ({why}" in (
            capsys.readouterr().out
        )
        assert token(path) == taker.owner["token"]
        taker.release()
    path.write_text("not a claim")  # unreadable: it ages by its mtime
    os.utime(path, (time.time() - 61, time.time() - 61))
    taker = claim(tmp_path)
    assert taker.acquire(lambda: False) and "is stale (no heartbeat" in capsys.readouterr().out
    taker.release()
    for other in ({"host": "elsewhere"}, {"ns": "another pid namespace"}):  # pid means nothing
        path.write_text(json.dumps({**me, **other, "pid": no_pid, "heartbeat": time.time()}))
        live = claim(tmp_path)
        assert not live.try_acquire()  # a fresh claim from elsewhere is left alone, at once
        assert json.loads(path.read_text())["pid"] == no_pid
    path.write_text(json.dumps({**me, "pid": no_pid, "heartbeat": time.time()}))
    assert live.try_acquire() and token(path) == live.owner["token"]
    live.release()


def test_claiming_sweeps_temporary_files_of_dead_writers_at_once(tmp_path):
    """A worker killed between writing its heartbeat file and renaming it leaves a
    ``.tmp``: the next claimant deletes it as soon as its process is gone, however
    young; a live writer's, and a set-aside claim younger than the timeout, stay."""
    me = claim(tmp_path).owner
    no_pid = int(open("/proc/sys/kernel/pid_max").read()) + 1
    folder = tmp_path / ".claims"
    folder.mkdir()
    dead = folder / ".abc.dead.tmp"
    dead.write_text(json.dumps({**me, "pid": no_pid, "token": "dead", "heartbeat": time.time()}))
    live = folder / ".abc.live.tmp"
    live.write_text(json.dumps({**me, "token": "live", "heartbeat": time.time()}))
    cut_off = folder / ".abc.cut.tmp"  # killed mid-write: unreadable, ages by its mtime
    cut_off.write_text("")
    aside = folder / "abc.json.stale-young"
    aside.write_text("{}")
    other_cell = folder / ".xyz.dead.tmp"
    other_cell.write_text(dead.read_text())
    c = claim(tmp_path)
    assert c.acquire(lambda: False)
    assert not dead.exists() and live.exists() and cut_off.exists() and aside.exists()
    assert other_cell.exists()
    c.release()
    for old in (cut_off, aside):
        os.utime(old, (time.time() - 61, time.time() - 61))
    c = claim(tmp_path)
    assert c.acquire(lambda: False)
    assert not cut_off.exists() and not aside.exists() and live.exists()
    c.release()


def test_a_claim_refreshed_after_being_judged_stale_is_put_back(tmp_path, capsys):
    """Same token, newer heartbeat: the owner is alive, so its claim stays."""
    owner = claim(tmp_path, heartbeat=3600)
    assert owner.acquire(lambda: False)
    judged = json.loads(owner.path.read_text())
    time.sleep(0.01)
    os.replace(owner._temp(), owner.path)  # the owner's heartbeat lands after the judgement
    claim(tmp_path)._take_over(judged, "no heartbeat for 61 s")
    assert "take over" not in capsys.readouterr().out
    assert json.loads(owner.path.read_text())["heartbeat"] > judged["heartbeat"]
    owner.check()
    owner.release()
    assert list(owner.path.parent.iterdir()) == []


def test_a_failed_put_back_leaves_the_owner_lost_and_the_newcomer_holding(tmp_path, capsys):
    owner, taker, newcomer = claim(tmp_path), claim(tmp_path), claim(tmp_path)
    assert owner.acquire(lambda: False)
    judged = {**json.loads(owner.path.read_text()), "heartbeat": 0.0}  # an older read
    read = taker._read

    def newcomer_slips_in(path):
        if ".stale-" in path.name:  # between the taker's rename and its put-back
            assert newcomer.try_acquire()
        return read(path)

    taker._read = newcomer_slips_in
    taker._take_over(judged, "no heartbeat for 61 s")
    assert "another worker claimed the cell meanwhile" in capsys.readouterr().out
    assert token(owner.path) == newcomer.owner["token"]
    assert eventually(owner.lost.is_set)  # its heartbeat sees the newcomer's claim...
    assert token(owner.path) == newcomer.owner["token"]  # ...and never writes over it
    with pytest.raises(records.ClaimLost, match=r"taken over \(.* pid \d+ holds it\)"):
        owner.check()
    owner.release()
    newcomer.check()
    newcomer.release()
    assert list(owner.path.parent.iterdir()) == []


def test_a_paused_owner_finds_its_claim_lost_and_writes_nothing_over_the_takers(tmp_path):
    owner = claim(tmp_path)
    assert owner.acquire(lambda: False)
    freeze(owner)
    taker = claim(tmp_path, timeout=0.3)
    assert taker.acquire(lambda: False)  # waits until the frozen heartbeat is 0.3 s old
    resume(owner)
    assert eventually(owner.lost.is_set)
    with pytest.raises(records.ClaimLost):
        owner.check()
    owner.release()  # leaves the taker's claim alone
    assert token(taker.path) == taker.owner["token"]
    taker.check()
    taker.release()


def test_a_deleted_claim_is_lost(tmp_path):
    owner = claim(tmp_path, heartbeat=3600)
    assert owner.acquire(lambda: False)
    owner.path.unlink()
    with pytest.raises(records.ClaimLost, match="it was deleted"):
        owner.check()
    owner.release()


def test_of_simultaneous_takers_of_a_stale_claim_exactly_one_wins(tmp_path, capsys):
    path = tmp_path / ".claims" / "abc.json"
    path.parent.mkdir()
    stale = {"host": "elsewhere", "pid": 1, "token": "x", "started": 0.0, "heartbeat": 0.0}
    path.write_text(json.dumps(stale))
    takers = [claim(tmp_path) for _ in range(8)]
    start, done = threading.Barrier(len(takers)), threading.Event()
    won: list[records.CellClaim] = []

    def take(c: records.CellClaim) -> None:
        start.wait()
        if c.acquire(done.is_set):
            won.append(c)

    threads = [threading.Thread(target=take, args=(c,)) for c in takers]
    for t in threads:
        t.start()
    assert eventually(lambda: bool(won))
    time.sleep(0.3)  # a few heartbeats: a winner that lost its claim has seen it by now
    done.set()
    for t in threads:
        t.join(10)
    holders = [c for c in won if c.loss() is None]
    assert len(holders) == 1 and token(path) == holders[0].owner["token"]
    assert capsys.readouterr().out.count("take over abc") == 1
    for c in won:
        c.release()
    assert list(path.parent.iterdir()) == []


def test_clean_cell_removes_what_dead_writers_left(tmp_path):
    mine = f"merged.partial-{records.worker_suffix()}"
    for d in ("merged", "merged.partial-h-1-ab", "merged.old-h-1-ab", mine):
        (tmp_path / d).mkdir()
    (tmp_path / ".result.json.x1.tmp").write_text("{")
    (tmp_path / "result.json").write_text("{}")
    records.clean_own(tmp_path)  # a worker that lost its claim removes only its own
    assert not (tmp_path / mine).exists() and (tmp_path / "merged.partial-h-1-ab").exists()
    records.clean_cell(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "result.json"]
