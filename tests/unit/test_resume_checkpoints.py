"""core/checkpoint.py: resume checkpoints as safetensors + a JSON record. The state
round-trips exactly; nothing is ever unpickled (a legacy pickle, or a pickle planted as
either file, is refused and its payload never runs); a truncated, mismatched or
half-written pair is refused with the file named, or the previous pair is kept."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from core import checkpoint as ckpt_mod
from core.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from core.train import CHECKPOINT_FILE, finetune
from methods.bora import CHECKPOINT_FILE as BORA_CHECKPOINT_FILE
from methods.bora import find_target_modules, train_bora
from tests.helpers.tiny_lm import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Payload:
    """Unpickling this creates ``marker``: what a tampered checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def payload_bytes(tmp_path: Path, marker: Path) -> bytes:
    """A ``torch.save`` pickle carrying :class:`Payload`, shown to be live: loading a copy
    with ``weights_only=False`` (the old resume code) does create its marker."""
    live, probe = tmp_path / "live.pt", tmp_path / "probe"
    torch.save({"model": Payload(probe)}, live)
    torch.load(live, weights_only=False)
    assert probe.exists()
    torch.save({"model": Payload(marker)}, live)
    return live.read_bytes()


def trained_state() -> dict:
    """A resume state as the trainers build it: weights, AdamW and LambdaLR after two
    steps, RNG states (uint8 tensors), a CUDA-style list of states, losses, tuples and a
    dict keyed by int."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        sched.step()
    gen = torch.Generator().manual_seed(7)
    torch.randint(5, (3,), generator=gen)
    return {
        "meta": {"steps": 9, "lr": 1e-2, "schedule": "linear", "pack": None, "shuffle": True},
        "step": 2,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "sampler": {"gen": gen.get_state(), "perm": torch.randperm(6), "pos": 4},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": [torch.get_rng_state(), torch.get_rng_state()[:10]],
        "losses": [2.0 / 3.0, 1e-300, float("inf")],
        "tagged": {1: ("a", 2), "__tuple__": []},
        "one_tag": {"__tensor__": "not a tensor"},
        "tokens": 123,
        "seconds": 0.1,
    }


def assert_identical(a, b, where="state"):
    """Same structure, same Python types, tensors equal in dtype, shape and bits."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_state_round_trips_exactly_as_safetensors_and_json(tmp_path):
    state = trained_state()
    record = tmp_path / "run" / "ckpt.json"
    write_checkpoint(record, state)
    assert_identical(read_checkpoint(record), state)
    (tensor_file,) = record.parent.glob("ckpt.*.safetensors")
    assert {p.name for p in record.parent.iterdir()} == {"ckpt.json", tensor_file.name}
    body = json.loads(record.read_text())
    assert body["sha256"] == hashlib.sha256(tensor_file.read_bytes()).hexdigest()
    assert body["state"]["optimizer"]["param_groups"][0]["lr"] == 1e-2  # scalars: JSON
    from safetensors.torch import load_file

    names = set(load_file(tensor_file))  # tensors: safetensors, named by their path
    assert {"torch_rng", "optimizer/state/0/exp_avg", "optimizer/state/0/step"} <= names
    assert read_checkpoint(tmp_path / "none.json") is None


def test_writing_refuses_what_it_could_not_read_back(tmp_path):
    with pytest.raises(TypeError, match="a/0.*set"):
        write_checkpoint(tmp_path / "c.json", {"a": [{1, 2}]})
    with pytest.raises(ValueError, match="both be named 'a/0'"):
        write_checkpoint(tmp_path / "c.json", {"a": {0: torch.ones(1), "0": torch.ones(1)}})
    assert not (tmp_path / "c.json").exists()


def test_a_kill_before_the_record_is_replaced_keeps_the_previous_pair(tmp_path, monkeypatch):
    record = tmp_path / "c.json"
    write_checkpoint(record, {"step": 1, "w": torch.zeros(3)})
    real = ckpt_mod._write_atomic

    def killed_at_record(path, data):
        if path == record:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_atomic", killed_at_record)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(record, {"step": 2, "w": torch.ones(3)})
    assert len(list(tmp_path.glob("c.*.safetensors"))) == 2  # the new tensors, uncommitted
    assert_identical(read_checkpoint(record), {"step": 1, "w": torch.zeros(3)})
    monkeypatch.setattr(ckpt_mod, "_write_atomic", real)
    write_checkpoint(record, {"step": 3, "w": torch.full((3,), 3.0)})
    assert len(list(tmp_path.glob("c.*.safetensors"))) == 1  # stale tensor files removed
    assert read_checkpoint(record)["step"] == 3


def _trainers(tmp_path: Path):
    """(checkpoint file name, a call that resumes from ``tmp_path``) for both trainers."""
    model, tok = make_tiny_lm(seed=0, hidden_size=16, num_layers=1)
    texts = ["1+1=2", "2+2=4"]
    kw = {"steps": 2, "checkpoint_dir": tmp_path, "checkpoint_every": 1}
    return {
        "finetune": (
            CHECKPOINT_FILE,
            lambda: finetune(model, tok, texts, batch_size=2, progress=False, **kw),
        ),
        "train_bora": (
            BORA_CHECKPOINT_FILE,
            lambda: train_bora(
                model,
                tok,
                {"a": texts, "b": texts},
                tau=1.0,
                modules=find_target_modules(model, ["q_proj"]),
                r=2,
                batch_size=2,
                **kw,
            ),
        ),
    }


@pytest.mark.parametrize("trainer", ["finetune", "train_bora"])
def test_a_legacy_pickle_checkpoint_is_refused_and_never_loaded(tmp_path, trainer):
    marker = tmp_path / "pwned"
    data = payload_bytes(tmp_path, marker)
    run_dir = tmp_path / "run"
    name, resume = _trainers(run_dir)[trainer]
    run_dir.mkdir()
    legacy = (run_dir / name).with_suffix(".pt")
    legacy.write_bytes(data)
    with pytest.raises(CheckpointError, match="old pickle format") as err:
        resume()
    assert str(legacy) in str(err.value) and "delete it to restart training" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("planted", ["record", "tensors"])
def test_a_pickle_planted_in_the_new_format_is_refused_and_never_loaded(tmp_path, planted):
    marker = tmp_path / "pwned"
    data = payload_bytes(tmp_path, marker)
    record = tmp_path / "run" / CHECKPOINT_FILE
    write_checkpoint(record, {"step": 1, "w": torch.ones(2)})
    (tensor_file,) = record.parent.glob("*.safetensors")
    if planted == "record":
        record.write_bytes(data)
        bad = f"checkpoint record {record} is unreadable"
    else:  # a consistent forgery: the record names the pickle's sha256
        body = json.loads(record.read_text())
        body["sha256"] = hashlib.sha256(data).hexdigest()
        record.write_text(json.dumps(body))
        tensor_file = ckpt_mod._tensor_file(record, body["sha256"])
        tensor_file.write_bytes(data)
        bad = f"checkpoint {tensor_file} does not match its record"
    model, tok = make_tiny_lm(seed=0, hidden_size=16, num_layers=1)
    with pytest.raises(CheckpointError) as err:
        finetune(model, tok, ["1+1=2"], steps=2, checkpoint_dir=record.parent, progress=False)
    assert bad in str(err.value) and "to restart training from scratch" in str(err.value)
    assert not marker.exists()


def _tamper_truncated(record: Path, tensor_file: Path) -> str:
    tensor_file.write_bytes(tensor_file.read_bytes()[:-7])
    return f"{tensor_file} does not match the sha256 in {record} (truncated or modified)"


def _tamper_swapped(record: Path, tensor_file: Path) -> str:
    """The tensor file of another checkpoint, renamed to this record's name."""
    other = record.with_name("other.json")
    write_checkpoint(other, {"step": 1, "w": torch.zeros(2)})
    next(record.parent.glob("other.*.safetensors")).replace(tensor_file)
    return f"{tensor_file} does not match the sha256 in {record}"


def _tamper_missing(record: Path, tensor_file: Path) -> str:
    tensor_file.unlink()
    return f"{tensor_file}, named by {record}, is missing"


def _tamper_truncated_record(record: Path, tensor_file: Path) -> str:
    record.write_text(record.read_text()[:40])
    return f"checkpoint record {record} is unreadable"


def _tamper_other_names(record: Path, tensor_file: Path) -> str:
    """A record whose sha256 is right but whose state names tensors the file lacks."""
    body = json.loads(record.read_text())
    body["state"]["w"] = {"__tensor__": "v"}
    record.write_text(json.dumps(body))
    return f"checkpoint {tensor_file} does not match its record {record} ('v')"


def _tamper_dropped_tensor(record: Path, tensor_file: Path) -> str:
    """A record whose sha256 is right but whose state no longer names a tensor of the file."""
    body = json.loads(record.read_text())
    body["state"]["w"] = 0
    record.write_text(json.dumps(body))
    return f"checkpoint {tensor_file} does not match its record {record} (tensors ['w']"


def _tamper_future_version(record: Path, tensor_file: Path) -> str:
    body = json.loads(record.read_text())
    body["version"] = 99
    record.write_text(json.dumps(body))
    return f"checkpoint record {record} is unreadable (format"


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_truncated,
        _tamper_swapped,
        _tamper_missing,
        _tamper_truncated_record,
        _tamper_other_names,
        _tamper_dropped_tensor,
        _tamper_future_version,
    ],
)
def test_a_truncated_or_mismatched_pair_is_refused_naming_the_file(tmp_path, tamper):
    record = tmp_path / "c.json"
    write_checkpoint(record, {"step": 2, "w": torch.ones(2)})
    (tensor_file,) = tmp_path.glob("c.*.safetensors")
    message = tamper(record, tensor_file)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(record)
    assert message in str(err.value)
    assert f"delete {tmp_path / 'c'}.* to restart training from scratch" in str(err.value)
