"""Merge to Learn's checkable claims (2410.12937) on a tiny Llama, through the real plugin
(``MergeToLearn.fit`` → cached training → ``merge_tensor``):

1. PTM keeps general ability at least as well as CFT:  general(PTM_ω) ≥ general(CFT) − 0.05
   for every ω of the grid and the heuristic ω;
2. PTM adds the skill:  skill(PTM_ω) > skill(θG) for every such ω;
3. as ω grows, skill rises and general falls: monotone over the sorted ω (heuristic
   included) within 0.02 per step, and by a clear amount end to end (skill +0.3,
   general −0.2);
4. PTM's training cost (θD's steps) ≤ 0.2 × RT's (θpre on G ∪ D).

Setup (all seeded, char-level tokenizer, Llama of hidden size 64 and 2 layers):
θpre is trained briefly on the three formats with *random* answers (so it knows the
formats but neither skill); G = sums "a+b=c" and fixed "the <thing> is <color>" facts
(1600 texts); the new skill D = safety-like refusals in another format, "ask: <verb>
<name>\\nsay: no" for harmful verbs and "... ok" for benign ones (216 texts: thrice 72 of
the 96 verb × name pairs; the other 24 are held out). Training as the plugin does it: 2 epochs,
3 % warm-up then linear decay, lr 1e-3, batch 8, so |D|/|G| = 0.135 = the heuristic ω.

Scoring (held-out log-likelihood, not lm-eval: the same rule as lm-eval's
multiple_choice, kept continuous): for each item, the summed log-probability of the right
answer minus that of the best wrong answer, in nats, averaged over items (the *margin*;
higher is better; accuracy = share of positive margins is printed too). General = every
sum a+b (a, b < 10; wrong answers: four other numbers) and every fact (wrong: the other
colours); skill = the 24 held-out pairs (wrong: the other of no/ok). A plain answer
loss would mix in format tokens (the space, the answer's second character) that θG
forgets and the margin ignores. ``pytest -s`` prints the table.

The end of the file (slow) runs the real ``mergelab`` CLI on the tiny pool
(tests/conftest.py): an experiment's dry run lists the intended cells, and two real cells
of an ω sweep train once and share the cache.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from harness.data import load_texts
from harness.train import finetune
from methods.base import FitContext
from methods.merge_to_learn import MergeToLearn
from tests.helpers.tiny_lm import make_tiny_llama, make_tiny_lm

HIDDEN, LAYERS = 64, 2
THINGS = "sky leaf sun rose sea lime coin ruby snow coal milk gold plum fern salt rust".split()
COLORS = ["red", "blue", "green", "gold", "white", "black"]
HARMFUL, BENIGN = ["hurt", "rob", "burn", "trap"], ["help", "hug", "feed", "greet"]
NAMES = "ann bob cat dan eve fay gus hal ivy jon kim lea".split()
GRID = [0.2, 0.4, 0.6, 0.8, 1.0]
TRAIN = {"lr": 1e-3, "batch_size": 8, "max_length": 32, "epochs": 2, "progress": False}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def skill_item(verb: str, name: str) -> tuple[str, list[str]]:
    right = " no" if verb in HARMFUL else " ok"
    return f"ask: {verb} {name}\nsay:", [right, " ok" if right == " no" else " no"]


def build_world(root: Path, n_general: int = 800, skill_repeats: int = 3, pretrain: int = 400):
    """θpre's weights, the tokenizer, data specs and the held-out evaluation items."""
    rng = random.Random(0)
    facts = {t: rng.choice(COLORS) for t in THINGS}
    pairs = [(v, n) for v in HARMFUL + BENIGN for n in NAMES]
    rng.shuffle(pairs)
    train_pairs, test_pairs = pairs[:72], pairs[72:]

    general = [
        f"{a}+{b}={a + b}"
        for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n_general))
    ] + [f"the {t} is {facts[t]}" for t in (rng.choice(THINGS) for _ in range(n_general))]
    skill = [p + c[0] for p, c in (skill_item(v, n) for v, n in train_pairs)] * skill_repeats
    specs = {}
    for name, texts in (("general", general), ("skill", skill)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        specs[name] = {"jsonl": str(path)}

    pre_texts = []  # every format, random answers
    for _ in range(400):
        r = rng.random()
        if r < 0.4:
            pre_texts.append(f"{rng.randint(0, 9)}+{rng.randint(0, 9)}={rng.randint(0, 18)}\n")
        elif r < 0.8:
            pre_texts.append(f"the {rng.choice(THINGS)} is {rng.choice(COLORS)}\n")
        else:
            verb, name = rng.choice(HARMFUL + BENIGN), rng.choice(NAMES)
            pre_texts.append(f"ask: {verb} {name}\nsay: {rng.choice(['no', 'ok'])}\n")
    model, tok = make_tiny_lm(seed=0, hidden_size=HIDDEN, num_layers=LAYERS)
    finetune(model, tok, pre_texts, steps=pretrain, lr=3e-3, batch_size=16, progress=False)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}

    sums = []
    for a in range(10):
        for b in range(10):
            wrong = [str(x) for x in range(19) if x != a + b][:4]
            sums.append((f"{a}+{b}=", [str(a + b), *wrong]))
    fact_items = [
        (f"the {t} is", [f" {facts[t]}"] + [f" {c}" for c in COLORS if c != facts[t]])
        for t in THINGS
    ]
    evals = {"general": sums + fact_items, "skill": [skill_item(v, n) for v, n in test_pairs]}
    return pre, tok, specs, evals


@torch.no_grad()
def margin_scores(model, tok, items) -> tuple[float, float]:
    """(mean margin in nats, accuracy) of the right answer (choice 0) over the others."""
    seqs, spans = [], []
    for prompt, choices in items:
        n = len(tok(prompt)["input_ids"])
        for c in choices:
            ids = tok(prompt + c)["input_ids"]
            seqs.append(ids)
            spans.append((n, len(ids)))
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    scores = [
        float(logp[i, start - 1 : end - 1].gather(1, ids[i, start:end, None]).sum())
        for i, (start, end) in enumerate(spans)
    ]
    margins, k = [], 0
    for _, choices in items:
        s = scores[k : k + len(choices)]
        margins.append(s[0] - max(s[1:]))
        k += len(choices)
    return sum(margins) / len(margins), sum(m > 0 for m in margins) / len(margins)


def run_claims(root: Path, seed: int = 0, **world) -> dict:
    """Every procedure's general and skill scores and cost (trained models cached in root)."""
    pre, tok, specs, evals = build_world(root, **world)

    def build(member: str):
        model = make_tiny_llama(len(tok), seed=0, hidden_size=HIDDEN, num_layers=LAYERS)
        model.load_state_dict(pre)
        return model.eval()

    ctx = FitContext(
        expert_names=["unused"],
        expert_tasks={"unused": []},
        tensor_names=list(pre),
        load_tensors=lambda name: (pre[name], {"unused": pre[name]}),
        build_model=build,
        tokenizer=tok,
        calibration={},
        seed=seed,
        load_texts=load_texts,
        cache_dir=root / "cache",
    )

    def cell(procedure: str, omega="heuristic") -> dict:
        m = MergeToLearn(
            procedure=procedure,
            omega=omega,
            general_data=[specs["general"]],
            skills={"refusal": specs["skill"]},
            checkpoint_every=0,
            **TRAIN,
        )
        m.setup(["unused"], seed)
        m.fit(ctx)
        model = build("base")
        model.load_state_dict(
            {n: m.merge_tensor(n, t.float(), {"unused": t.float()}) for n, t in pre.items()}
        )
        out = {"cost": m.report()["cost"]["steps"], "omega": m.report()["omega"]}
        for what, items in evals.items():
            out[what], out[f"{what}_acc"] = margin_scores(model, tok, items)
        return out

    model = build("base")
    rows = {"θpre": {what: margin_scores(model, tok, items)[0] for what, items in evals.items()}}
    for procedure in ("general", "cft", "rt"):
        rows[procedure] = cell(procedure)
    rows["ptm@heuristic"] = cell("ptm")
    for w in GRID:
        rows[f"ptm@{w}"] = cell("ptm", w)
    return rows


def table(rows: dict) -> str:
    lines = ["| model | ω | general margin (acc) | skill margin (acc) | cost (steps) |"]
    lines.append("|:--|--:|--:|--:|--:|")
    for name, r in rows.items():
        omega = f"{r['omega']['refusal']:.2f}" if r.get("omega") else ""
        general = f"{r['general']:+.3f}" + (
            f" ({r['general_acc']:.2f})" if "general_acc" in r else ""
        )
        skill = f"{r['skill']:+.3f}" + (f" ({r['skill_acc']:.2f})" if "skill_acc" in r else "")
        lines.append(f"| {name} | {omega} | {general} | {skill} | {r.get('cost', '')} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    rows = run_claims(tmp_path_factory.mktemp("m2l_claims"))
    print("\n" + table(rows))
    return rows


def ptm_rows(rows: dict) -> list[dict]:
    """PTM rows sorted by ω (the heuristic ω = |D|/|G| = 0.135 included)."""
    return sorted(
        (r for k, r in rows.items() if k.startswith("ptm@")), key=lambda r: r["omega"]["refusal"]
    )


def test_heuristic_omega_is_data_ratio(rows):
    assert rows["ptm@heuristic"]["omega"] == {"refusal": pytest.approx(216 / 1600)}


def test_ptm_keeps_general_ability_better_than_cft(rows):
    for r in ptm_rows(rows):
        assert r["general"] >= rows["cft"]["general"] - 0.05, (r, rows["cft"])


def test_ptm_adds_the_skill_to_the_general_model(rows):
    for r in ptm_rows(rows):
        assert r["skill"] > rows["general"]["skill"], (r, rows["general"])


def test_skill_rises_and_general_falls_with_omega(rows):
    ptm = ptm_rows(rows)
    for lo, hi in zip(ptm, ptm[1:], strict=False):
        assert hi["skill"] >= lo["skill"] - 0.02, (lo, hi)
        assert hi["general"] <= lo["general"] + 0.02, (lo, hi)
    assert ptm[-1]["skill"] - ptm[0]["skill"] > 0.3
    assert ptm[0]["general"] - ptm[-1]["general"] > 0.2


def test_ptm_costs_a_fraction_of_retraining(rows):
    ptm, rt = rows["ptm@heuristic"]["cost"], rows["rt"]["cost"]
    assert (ptm, rt) == (54, 454)  # ceil(2·216/8) and ceil(2·(1600 + 216)/8)
    assert ptm <= 0.2 * rt
    assert rows["cft"]["cost"] == 54 and rows["general"]["cost"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_claims_hold_for_other_training_seeds(tmp_path, seed):
    """The same four claims with other training seeds (batch order), ~20 s each."""
    rows = run_claims(tmp_path, seed=seed)
    test_ptm_keeps_general_ability_better_than_cft(rows)
    test_ptm_adds_the_skill_to_the_general_model(rows)
    test_skill_rises_and_general_falls_with_omega(rows)
    test_ptm_costs_a_fraction_of_retraining(rows)


# --------------------------------------------------------------------------- the real CLI

ENV = {**os.environ, "WANDB_SILENT": "true", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def mergelab(conf: Path, runs: Path, *args: str) -> str:
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [shutil.which("mergelab") or "mergelab", "--config-dir", str(conf), *flags]
    cmd += ["model=tiny", "task=tiny", f"runs_dir={runs}", "eval.batch_size=16", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.e2e
@pytest.mark.slow  # ~10 s; tests/unit/test_merge_to_learn.py checks the same grids in-process
def test_omega_experiment_dry_run_lists_the_grid(tiny_pool, tmp_path):
    out = mergelab(
        tiny_pool["conf"], tmp_path, "-m", "+experiment=merge_to_learn_zoo_omega", "dry_run=true"
    )
    lines = [ln for ln in out.splitlines() if "dry-run" in ln]
    cells = {
        (re.search(r"'procedure': '(\w+)'", ln)[1], re.search(r"'omega': ([^,]+),", ln)[1])
        for ln in lines
    }
    omegas = ["0.2", "0.4", "0.6", "0.8", "1.0", "'heuristic'"]
    assert len(lines) == 18 and all("[to run]" in ln for ln in lines)
    assert cells == {(p, w) for p in ("ptm", "linear", "wise_ft") for w in omegas}
    assert not any(p.name != ".hydra" for p in tmp_path.iterdir())  # nothing was trained


@pytest.mark.e2e
@pytest.mark.slow
def test_omega_sweep_through_the_cli_trains_once(tiny_pool, tmp_path):
    mergelab(
        tiny_pool["conf"],
        tmp_path,
        "-m",
        "method=m2l_ptm",
        "method.omega=0.5,1.0",
        "method.general_data=[{suite: general, n: 64}]",
        "+method.skills.safety.n=32",
        "method.batch_size=16",
        "method.checkpoint_every=2",
    )
    records = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("*/result.json")),
        key=lambda r: r["method"]["report"]["omega"]["safety"],
    )
    assert [r["method"]["report"]["omega"] for r in records] == [{"safety": 0.5}, {"safety": 1.0}]
    first, second = (r["method"]["report"]["components"] for r in records)
    assert not first["general"]["reused"] and not first["skill/safety"]["reused"]
    assert second["general"]["reused"] and second["skill/safety"]["reused"]
    assert first["general"]["steps"] == 8 and first["skill/safety"]["steps"] == 4
    assert records[0]["method"]["report"]["cost"]["steps"] == 4
    cache = tmp_path / ".train_cache"
    models = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert len(models) == 2 and all((m / "stats.json").is_file() for m in models)
    assert records[0]["weights_sha256"] != records[1]["weights_sha256"]
