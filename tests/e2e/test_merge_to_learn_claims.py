"""Merge to Learn's checkable claims (2410.12937) on a tiny Llama, through the real plugin
(``MergeToLearn.fit`` → cached training → ``merge_tensor``), each a paired test over five
training seeds (0-4: batch order) with a verdict (:mod:`tests.helpers.claims`: the
two-level bootstrap interval of A − B over seeds and held-out items):

1. PTM keeps general ability better than CFT: general(PTM_ω) > general(CFT) for every ω of
   the grid and the heuristic ω;
2. PTM adds the skill: skill(PTM_ω) > skill(θG) for every such ω;
3. as ω grows, skill rises and general falls: PTM at ω = 1.0 against ω = 0.2;
4. PTM's training cost (θD's steps) ≤ 0.2 × RT's (θpre on G ∪ D): exact step counts.

Each test asserts the measured verdict; ``pytest -m slow -s`` prints every seed's table and
the claims table.

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
higher is better; accuracy = share of positive margins is printed too); an item's margin
is its value in the paired tests. General = every
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

from core.train import finetune
from harness.data import load_texts
from methods.base import FitContext
from methods.merge_to_learn import MergeToLearn
from tests.helpers.claims import Verdict, compare, markdown
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
def margins(model, tok, items) -> list[float]:
    """Per item: log-probability of the right answer (choice 0) minus the best other, in nats."""
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
    out, k = [], 0
    for _, choices in items:
        s = scores[k : k + len(choices)]
        out.append(s[0] - max(s[1:]))
        k += len(choices)
    return out


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
            out[f"{what}_items"] = margins(model, tok, items)
            out[what] = sum(out[f"{what}_items"]) / len(items)
        return out

    model = build("base")
    rows = {"θpre": {what: sum(margins(model, tok, it)) / len(it) for what, it in evals.items()}}
    for procedure in ("general", "cft", "rt"):
        rows[procedure] = cell(procedure)
    rows["ptm@heuristic"] = cell("ptm")
    for w in GRID:
        rows[f"ptm@{w}"] = cell("ptm", w)
    return rows


def _accuracy(row: dict, what: str) -> str:
    """(share of positive margins), when the row has per-item margins."""
    got = row.get(f"{what}_items")
    return f" ({sum(m > 0 for m in got) / len(got):.2f})" if got else ""


def table(rows: dict) -> str:
    lines = ["| model | ω | general margin (acc) | skill margin (acc) | cost (steps) |"]
    lines.append("|:--|--:|--:|--:|--:|")
    for name, r in rows.items():
        omega = f"{r['omega']['refusal']:.2f}" if r.get("omega") else ""
        general, skill = (
            f"{r[w]:+.3f}"
            + (
                f" ({sum(m > 0 for m in r[w + '_items']) / len(r[w + '_items']):.2f})"
                if w + "_items" in r
                else ""
            )
            for w in ("general", "skill")
        )
        lines.append(f"| {name} | {omega} | {general} | {skill} | {r.get('cost', '')} |")
    return "\n".join(lines)


SEEDS = (0, 1, 2, 3, 4)  # training seeds (batch order)
_RUNS: dict[int, dict] = {}


def rows_for(seed: int, root: Path) -> dict:
    """Every procedure's rows for one training seed (computed once per session)."""
    if seed not in _RUNS:
        (root / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        _RUNS[seed] = run_claims(root / f"seed{seed}", seed=seed)
        print(f"\nseed {seed}\n" + table(_RUNS[seed]))
    return _RUNS[seed]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return rows_for(0, tmp_path_factory.mktemp("m2l_claims"))


def ptm_keys(rows: dict) -> list[str]:
    """PTM rows sorted by ω (the heuristic ω = |D|/|G| = 0.135 included)."""
    keys = [k for k in rows if k.startswith("ptm@")]
    return sorted(keys, key=lambda k: rows[k]["omega"]["refusal"])


def test_heuristic_omega_is_data_ratio(rows):
    assert rows["ptm@heuristic"]["omega"] == {"refusal": pytest.approx(216 / 1600)}


def test_ptm_costs_a_fraction_of_retraining(rows):
    ptm, rt = rows["ptm@heuristic"]["cost"], rows["rt"]["cost"]
    assert (ptm, rt) == (54, 454)  # ceil(2·216/8) and ceil(2·(1600 + 216)/8)
    assert ptm <= 0.2 * rt
    assert rows["cft"]["cost"] == 54 and rows["general"]["cost"] == 0


def _claims(seeds: dict[int, dict]) -> list[tuple[str, str, str, str, int]]:
    """(claim, A, B, what, direction) for every claim, over the PTM rows of the grid."""
    ptm = ptm_keys(seeds[SEEDS[0]])
    out = []
    for k in ptm:
        out.append((f"general: {k} > cft", k, "cft", "general", 1))
    for k in ptm:
        out.append((f"skill: {k} > θG", k, "general", "skill", 1))
    out.append(("skill rises with ω: ptm@1.0 > ptm@0.2", "ptm@1.0", "ptm@0.2", "skill", 1))
    out.append(("general falls with ω: ptm@1.0 < ptm@0.2", "ptm@1.0", "ptm@0.2", "general", -1))
    return out


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, Verdict]:
    """Each claim as a paired interval over the 5 training seeds (items: the held-out
    general and skill items, margins in nats)."""
    root = tmp_path_factory.mktemp("m2l_seeds")
    seeds = {s: rows_for(s, root) for s in SEEDS}
    out = {}
    for claim, a, b, what, direction in _claims(seeds):
        per = [[dict(enumerate(seeds[s][side][f"{what}_items"])) for s in SEEDS] for side in (a, b)]
        out[claim] = compare(claim, per[0], per[1], direction=direction)
    print("\n" + markdown(list(out.values())))
    return out


# claim → measured verdict (a strict xfail when "not reproduced")
EXPECTED = {
    **{f"general: ptm@{w} > cft": "reproduced" for w in ("heuristic", *GRID)},
    **{f"skill: ptm@{w} > θG": "reproduced" for w in ("heuristic", *GRID)},
    "skill rises with ω: ptm@1.0 > ptm@0.2": "reproduced",
    "general falls with ω: ptm@1.0 < ptm@0.2": "reproduced",
}


@pytest.mark.slow
@pytest.mark.parametrize("claim", list(EXPECTED))
def test_claim_verdict(verdicts, claim):
    assert verdicts[claim].verdict == EXPECTED[claim], verdicts[claim]


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
