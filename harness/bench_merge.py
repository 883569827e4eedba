"""Benchmark: ``mergelab-merge`` against mergekit on TinyLlama-1.1B-shaped checkpoints.

    python -m harness.bench_merge [--dir DIR] [--repeats 3] [--methods ta ties ties_global]

Builds (once, into ``DIR/ckpt``) a base and three experts with TinyLlama-1.1B's tensor
shapes (22 layers, hidden 2048, intermediate 5632, 4 KV heads, vocab 32000, untied head):
random bf16 weights, 2.2 GB each, sharded at 1 GB; an expert is the base plus small noise.
Then, for each method, runs both tools alternately on the same mergekit YAML
(``mergekit-yaml`` and ``mergelab-merge --mergekit``; ``ties_global`` is mergelab's
default, paper-faithful TIES against mergekit's ``ties``), ``--repeats`` pairs, each as its
own process (wall clock; peak RSS from ``wait4``), the other tool's output deleted first.

It first measures the I/O floor on the same files: reading the four checkpoints (warm: a
first read brings them into the page cache, where they stay for the runs) and writing one
checkpoint's bytes. It prints
every run, then the medians, the ratio mergelab ÷ mergekit pair by pair (wall and peak
RSS), and mergelab's wall as a multiple of the I/O floor.

Both tools run on the CPU with their defaults; mergelab with ``threads`` (default: every
core; its data-free merges are entrywise, so the count does not change the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.sources import CheckpointSource

# TinyLlama-1.1B's configuration (the shapes are what matters).
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
MEMBERS = ("base", "e1", "e2", "e3")
SHARD = 1 << 30

# mergekit configs: merge_method, per-model parameters, global parameters
CONFIGS = {
    "ta": ("task_arithmetic", {"weight": 1.0}, {"lambda": 0.3}),
    "ties": ("ties", {"weight": 1.0, "density": 0.5}, {"lambda": 1.0}),
}
# mergelab runs: (mergekit config it is paired with, overrides after the translation)
KEEP_TIES = ["method.tie_break=keep_all"]
VARIANTS = {
    # mergekit's task arithmetic, as translated (bit-identical to mergekit on float32)
    "ta": ("ta", []),
    # mergekit's TIES conventions (per-tensor count ⌊d·n⌋, weighted vote), but entries tied
    # with the threshold kept instead of argsort's arbitrary exactly-k (a selection, no sort)
    "ties": ("ties", KEEP_TIES),
    # mergelab's default, paper-faithful TIES (global trim, ⌈d·n⌉, unweighted vote)
    "ties_global": (
        "ties",
        KEEP_TIES
        + [
            "method.trim_scope=global",
            "method.keep_count=ceil",
            "method.sign_vote=unweighted",
            "method.weight_product=fused",
            "method.zero_sign=zero",
        ],
    ),
}


def shapes() -> dict[str, tuple[int, ...]]:
    h, i = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    kv = h // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]  # head_dim × KV heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (CONFIG["vocab_size"], h)}
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (CONFIG["vocab_size"], h)
    return out


def build(root: Path) -> None:
    """The four checkpoints, unless a previous run left them complete."""
    for i, member in enumerate(MEMBERS):
        d = root / member
        if (d / "config.json").is_file():
            continue
        print(f"[bench] building {d} ...", flush=True)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        base_gen = torch.Generator().manual_seed(0)
        own_gen = torch.Generator().manual_seed(1000 + i)
        shard: dict[str, torch.Tensor] = {}
        weight_map: dict[str, str] = {}
        size = total = 0

        for name, shape in shapes().items():
            w = torch.randn(shape, generator=base_gen) * 0.02 + (1.0 if len(shape) == 1 else 0.0)
            if member != "base":
                w += 0.002 * torch.randn(shape, generator=own_gen)
            w = w.to(torch.bfloat16)
            if shard and size + 2 * w.numel() > SHARD:
                _save_shard(shard, tmp, weight_map)
                shard, size = {}, 0
            shard[name] = w
            size += 2 * w.numel()
            total += 2 * w.numel()
        _save_shard(shard, tmp, weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
        (tmp / "config.json").write_text(json.dumps(CONFIG))
        tmp.rename(d)


def _save_shard(shard: dict, directory: Path, weight_map: dict[str, str]) -> None:
    name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    save_file(shard, directory / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))


def mergekit_yaml(root: Path, config: str) -> str:
    merge_method, per_model, global_params = CONFIGS[config]
    lines = [f"merge_method: {merge_method}", f"base_model: {root / 'base'}", "models:"]
    for member in MEMBERS[1:]:
        lines.append(f"  - model: {root / member}")
        lines.append(f"    parameters: {json.dumps(per_model)}")
    lines.append(f"parameters: {json.dumps(global_params)}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, float, float]:
    """(wall s, peak RSS GB, user s, sys s) of one process."""
    # stderr goes to a file, not a pipe: a child writing more than a pipe holds would block
    # while we block in wait4
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stderr.seek(0)
        err = stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, usage.ru_utime, usage.ru_stime


def io_floor(root: Path, out: Path) -> tuple[float, float]:
    """(warm read of the four checkpoints, write of one checkpoint's bytes) in seconds."""
    files = sorted(p for m in MEMBERS for p in (root / m).glob("*.safetensors"))
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for _ in range(2):  # the first pass warms the page cache
        start = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
        read = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(0, size, SHARD):
        with open(out / f"floor-{i // SHARD}.bin", "wb") as fh:
            left = min(SHARD, size - i)
            while left:
                left -= fh.write(view[: min(left, len(view))])
    write = time.perf_counter() - start
    shutil.rmtree(out)
    return read, write


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.bench_merge", description=__doc__)
    p.add_argument("--dir", default="/tmp/mergelab-bench", help="checkpoints and outputs")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs per method")
    p.add_argument(
        "--methods", nargs="+", default=["ta", "ties", "ties_global"], help="ta ties ties_global"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="mergelab threads")
    args = p.parse_args(argv)
    root = Path(args.dir)
    ckpt, out = root / "ckpt", root / "out"
    build(ckpt)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "TQDM_DISABLE": "1"}
    shutil.rmtree(out, ignore_errors=True)
    read, write = io_floor(ckpt, out)  # first: it also brings the checkpoints into the cache
    floor = read + write
    rows: list[dict] = []
    configs = sorted({VARIANTS[v][0] for v in args.methods}, key=list(CONFIGS).index)
    # the mergelab variants paired with each mergekit config, in --methods order
    variants = {c: [v for v in args.methods if VARIANTS[v][0] == c] for c in configs}
    for config in configs:
        (root / f"{config}.yml").write_text(mergekit_yaml(ckpt, config))
    for rep in range(args.repeats):
        for config in configs:
            cfg = root / f"{config}.yml"
            runs = {
                "mergekit": [str(bin_dir / "mergekit-yaml"), str(cfg), str(out)]
                + ["--out-shard-size", "1B"]
            }
            for v in variants[config]:
                runs[v] = [str(bin_dir / "mergelab-merge"), "--mergekit", str(cfg), str(out)]
                runs[v] += [f"threads={args.threads}", *VARIANTS[v][1]]
            order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
            for label in order:
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, user, sys_s = run(runs[label], env)
                rows.append(dict(config=config, label=label, rep=rep, wall=wall, rss=rss))
                if rep == args.repeats - 1:  # keep the last outputs to compare them
                    shutil.rmtree(root / f"kept-{config}-{label}", ignore_errors=True)
                    out.rename(root / f"kept-{config}-{label}")
                print(
                    f"[bench] {config:4s} rep {rep} {label:11s} wall {wall:7.2f} s  "
                    f"peak RSS {rss:5.2f} GB  user {user:7.2f} s  sys {sys_s:6.2f} s",
                    flush=True,
                )
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"\nI/O floor: warm read of 4 checkpoints {read:.2f} s + write of 1 "
        f"{write:.2f} s = {floor:.2f} s\n"
    )
    print("| run | paired with mergekit's | median wall s | median peak RSS GB |")
    print("|:--|:--|--:|--:|")
    for config in configs:
        for label in ["mergekit", *variants[config]]:
            mine = [r for r in rows if r["config"] == config and r["label"] == label]
            wall = statistics.median(r["wall"] for r in mine)
            rss = statistics.median(r["rss"] for r in mine)
            name = f"mergekit {CONFIGS[config][0]}" if label == "mergekit" else f"mergelab {label}"
            print(f"| {name} | {CONFIGS[config][0]} | {wall:.2f} | {rss:.2f} |")
    print(
        "\n| mergelab run | pair | wall ÷ mergekit's | peak RSS ÷ mergekit's | wall ÷ I/O floor |"
    )
    print("|:--|--:|--:|--:|--:|")
    for v in args.methods:
        config = VARIANTS[v][0]
        for rep in range(args.repeats):
            pair = {r["label"]: r for r in rows if r["config"] == config and r["rep"] == rep}
            ml, mk = pair[v], pair["mergekit"]
            print(
                f"| {v} | {rep} | {ml['wall'] / mk['wall']:.3f} | "
                f"{ml['rss'] / mk['rss']:.3f} | {ml['wall'] / floor:.2f} |"
            )
    for config in configs:
        for v in variants[config]:
            print(
                f"\n{v} against mergekit's {CONFIGS[config][0]}: "
                + compare(root / f"kept-{config}-mergekit", root / f"kept-{config}-{v}")
            )


def compare(a: Path, b: Path) -> str:
    """How two checkpoints' weights differ: the fraction of entries that differ and the
    largest difference."""
    sa, sb = CheckpointSource(a), CheckpointSource(b)
    if set(sa.names) != set(sb.names):
        return f"different tensor names ({sorted(set(sa.names) ^ set(sb.names))[:4]} ...)"
    differ = total = 0
    largest = 0.0
    for name in sa.names:
        x, y = sa.get(name), sb.get(name)
        total += x.numel()
        n = int((x != y).sum())
        differ += n
        if n:
            largest = max(largest, float((x.float() - y.float()).abs().max()))
    return f"{differ / total:.2%} of {total:,} entries differ (largest difference {largest:.3g})"


if __name__ == "__main__":
    main()
