"""BoRA's checkable claims (2407.15857) on a tiny multi-task set, through the plugin.

Set-up: a tiny random Llama (tests/helpers/tiny_lm, character tokenizer) and four tasks
with distinct formats and unequal sizes (8, 24, 72, 216 training texts) that share one
world: a lexicon of 40 made-up words and a fixed word → partner map, written by each task
in its own format ("Q: kalo? A: tesu.", "kalo -> tesu", ...). The small tasks see a few
words only; sharing with the big ones teaches them the rest, while a single shared
adapter must also spread its first-token guess over every format, weighted by data size.

For every τ of the paper's grid (0, 1, 10, 100, 1000, 10⁴) and ``shared``, and each of
three training seeds, one BoRA training (LoRA r = 4 on every projection and the head, 200
steps, 8 texts per task per step, lr 5e-3 constant) through ``BoRA.fit`` — the other three
tasks' cells hit the cache, as in a sweep over ``method.task`` —; each task's merged model
is scored by its perplexity on 60 held-out texts of its own task (exp of the mean token
NLL, computed directly), averaged over the seeds. Claims checked: U-shape of the mean
perplexity with an interior minimum below both extremes; every task better at the best τ
than at τ = 0 (strictly, no tolerance); ‖θ_d − Θ‖ increasing with the task's size at the
best τ; the smallest task gaining most, the two smaller more than the two larger. These
are ``slow`` (21 trainings: ~2.5 min alone, ~4-5 min on a loaded 2-core machine, one
thread). Not slow: the direct perplexity checked against the suite's lm-eval
``loglikelihood_rolling`` task on one BoRA model, and one two-cell sweep through the CLI.

Measured (seed means; ``python3 -m pytest -m slow -s tests/e2e/test_bora_claims.py``):

    τ        mean   qa(8)   arrow(24) hash(72) angle(216)   ‖θ_d − Θ‖ (qa … angle)
    0        6.26   15.21   4.26      2.65     2.90         4.23 4.09 4.17 4.81
    1        4.68    9.51   3.57      2.96     2.67         1.51 2.27 2.61 3.14
    10       3.43    4.68   3.53      2.60     2.91         0.62 0.98 1.17 1.44
    100      2.84    3.17   3.21      2.38     2.60         0.24 0.29 0.38 0.47
    1000     3.73    5.69   3.63      2.78     2.81         0.08 0.12 0.13 0.18
    10000    6.36   12.22   5.78      3.60     3.84         0.03 0.04 0.04 0.06
    shared   5.26    9.37   5.60      3.20     2.88         0

Gain at τ = 100 over τ = 0: 79%, 25%, 10.3%, 10.4% (the two large tasks tie).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from harness.data import load_texts
from harness.train import DEFAULT_LORA_TARGETS
from methods.base import FitContext
from methods.bora import SHARED, BoRA
from tests.helpers.tiny_lm import make_tiny_llama, make_tiny_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]

TAUS = (0, 1, 10, 100, 1000, 10000, SHARED)
SEEDS = (0, 1, 2)  # training seeds (adapter init, batch order) averaged over
CONS, VOWELS = "bdfgklmnprstvz", "aeiou"
FORMATS = {  # task → (format, training texts); distinct from the first character on
    "qa": ("Q: {w}? A: {p}.", 8),
    "arrow": ("{w} -> {p}", 24),
    "hash": ("# {w} = {p}", 72),
    "angle": ("<{w}|{p}>", 216),
}
OPTIONS = dict(
    r=4,
    alpha=16,
    target_modules=[*DEFAULT_LORA_TARGETS, "lm_head"],
    steps=200,
    lr=5e-3,
    batch_size=8,
    max_length=32,
    seed=0,
)


def lexicon(n: int = 24, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(CONS) + rng.choice(VOWELS) for _ in range(2)))
    out = sorted(words)
    rng.shuffle(out)
    return out


WORDS = lexicon()
PARTNER = {w: WORDS[(i * 7 + 3) % len(WORDS)] for i, w in enumerate(WORDS)}


def task_texts(task: str, n: int, split: int) -> list[str]:
    rng = random.Random(f"{task}-{split}")
    fmt = FORMATS[task][0]
    return [fmt.format(w=(w := rng.choice(WORDS)), p=PARTNER[w]) for _ in range(n)]


TRAIN = {t: task_texts(t, n, 1) for t, (_, n) in FORMATS.items()}
TEST = {t: task_texts(t, 60, 2) for t in FORMATS}


@torch.no_grad()
def text_nll(model, tokenizer, texts, *, lm_eval_convention: bool = False) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of ``texts``.

    Default: the tokens of ``tokenizer(text)`` after its BOS, each given what precedes it.
    ``lm_eval_convention``: what lm-eval's ``loglikelihood_rolling`` scores with HFLM's
    defaults, i.e. every token of ``tokenizer(text)`` (BOS included) after one more BOS
    prefix token.
    """
    total, count = 0.0, 0
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        if lm_eval_convention:
            ids = [tokenizer.bos_token_id, *ids]
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
        target = torch.tensor(ids[1:])
        total -= float(torch.log_softmax(logits, -1)[torch.arange(len(target)), target].sum())
        count += len(target)
    return total, count


def perplexity(model, tokenizer, texts) -> float:
    total, count = text_nll(model, tokenizer, texts)
    return math.exp(total / count)


def write_specs(root: Path) -> dict[str, dict]:
    root.mkdir(parents=True, exist_ok=True)
    specs = {}
    for task, texts in TRAIN.items():
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        specs[task] = {"jsonl": str(path)}
    return specs


class Setup:
    """The tiny base, a ``FitContext`` over it (cache under ``root``) and the task specs."""

    def __init__(self, root: Path):
        self.specs = write_specs(root / "data")
        self.tok = tok = make_tiny_tokenizer()
        base = make_tiny_llama(len(tok), seed=0)
        self.state = state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.ctx = FitContext(
            expert_names=["x"],
            expert_tasks={"x": []},
            tensor_names=list(state),
            load_tensors=lambda n: (state[n].float(), {"x": state[n].float()}),
            build_model=self.build_model,
            tokenizer=tok,
            calibration={},
            load_texts=load_texts,
            cache_dir=root / "cache",
        )

    def build_model(self, member: str = "base"):
        model = make_tiny_llama(len(self.tok), seed=0)
        model.load_state_dict(self.state)
        return model.eval()

    def cell(self, **options) -> tuple[BoRA, torch.nn.Module]:
        """Fit one BoRA cell and return it with its merged model (base + task's LoRA)."""
        method = BoRA(tasks=self.specs, **{**OPTIONS, **options})
        method.fit(self.ctx)
        model = self.build_model()
        model.load_state_dict(
            {n: method.merge_tensor(n, t.float(), {}) for n, t in self.state.items()}
        )
        return method, model


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Per τ, averaged over the training seeds: ``ppl`` {task: test perplexity}, ``mean``
    (over tasks), ``distance`` {task: ‖θ_d − Θ‖}, ``n_train``; and ``hits`` (cache hit of
    every cell, per seed)."""
    setup = Setup(tmp_path_factory.mktemp("bora_claims"))
    out = {}
    for tau in TAUS:
        ppl = {t: [] for t in FORMATS}
        dist = {t: [] for t in FORMATS}
        hits, seconds = [], 0.0
        for seed in SEEDS:
            seed_hits = []
            for task in FORMATS:
                method, model = setup.cell(tau=tau, task=task, seed=seed)
                rep = method.report()
                seed_hits.append(rep["cache"]["hit"])
                ppl[task].append(perplexity(model, setup.tok, TEST[task]))
            hits.append(seed_hits)
            seconds += rep["seconds"]
            for t, facts in rep["tasks"].items():
                dist[t].append(facts["distance"])
        row = {
            "ppl": {t: sum(v) / len(v) for t, v in ppl.items()},
            "distance": {t: sum(v) / len(v) for t, v in dist.items()},
            "n_train": {t: facts["n_train"] for t, facts in rep["tasks"].items()},
            "hits": hits,
        }
        row["mean"] = sum(row["ppl"].values()) / len(row["ppl"])
        out[tau] = row
        print(
            f"tau={tau!s:>6} mean ppl {row['mean']:.3f} "
            + " ".join(f"{t}={p:.3f}" for t, p in row["ppl"].items())
            + " | dist "
            + " ".join(f"{t}={v:.3f}" for t, v in row["distance"].items())
            + f" | train {seconds:.1f}s for {len(SEEDS)} seeds"
        )
    return out


def best_tau(sweep):
    """The τ of the lowest mean test perplexity."""
    return min(sweep, key=lambda t: sweep[t]["mean"])


@pytest.mark.slow
def test_sweep_trains_once_per_tau(sweep):
    for row in sweep.values():
        assert row["hits"] == [[False, True, True, True]] * len(SEEDS)


@pytest.mark.slow
def test_perplexity_vs_tau_is_u_shaped(sweep):
    means = {t: r["mean"] for t, r in sweep.items()}
    best = best_tau(sweep)
    assert best not in (0, SHARED), means
    assert means[best] < 0.9 * means[0] and means[best] < 0.9 * means[SHARED], means
    # and the finite end of the grid is already on the way up
    assert means[TAUS[-2]] > 1.2 * means[best], means


@pytest.mark.slow
def test_every_task_improves_at_the_best_tau(sweep):
    """Strictly, no tolerance, on seed means (one seed alone can leave the largest task
    level: measured +0.1% for seed 2)."""
    best = best_tau(sweep)
    for task in FORMATS:
        assert sweep[best]["ppl"][task] < sweep[0]["ppl"][task], (task, best)


@pytest.mark.slow
def test_distance_to_global_grows_with_task_size(sweep):
    best = best_tau(sweep)
    sizes = sweep[best]["n_train"]
    by_size = sorted(sizes, key=sizes.get)
    dist = [sweep[best]["distance"][d] for d in by_size]
    assert dist == sorted(dist) and len(set(dist)) == len(dist), (by_size, dist)
    assert all(v == 0.0 for v in sweep[SHARED]["distance"].values())


@pytest.mark.slow
def test_small_tasks_gain_most(sweep):
    best = best_tau(sweep)
    gain = {t: 1 - sweep[best]["ppl"][t] / sweep[0]["ppl"][t] for t in FORMATS}
    by_size = sorted(FORMATS, key=lambda t: FORMATS[t][1])
    assert gain[by_size[0]] == max(gain.values()), gain
    assert min(gain[t] for t in by_size[:2]) > max(gain[t] for t in by_size[2:]), gain


def test_direct_perplexity_matches_lm_eval_ppl_task(tmp_path):
    """Our perplexity (used above) against lm-eval's on the suite's math ppl task, for one
    BoRA model (a short training, τ = 10)."""
    from evals.lm_eval import evaluate, validate_tasks
    from evals.suite.build import build_suite, load_split, tasks_dir

    sizes = {
        "general": {"train": 3},
        "knowledge": {"test": 4, "calibration": 2},
        "math": {"test": 8, "calibration": 2, "train": 3},
        "code": {"test": 4, "calibration": 2, "train": 3},
        "safety": {"test": 4, "calibration": 2, "train": 3},
    }
    suite = build_suite(tmp_path / "suite", seed=0, sizes=sizes)
    setup = Setup(tmp_path)
    _, model = setup.cell(tau=10, task="qa", steps=20)
    tok = setup.tok
    task = "mergelab_math_ppl"
    res = evaluate(
        model,
        tok,
        [task],
        task_manager=validate_tasks([task], str(tasks_dir(suite))),
        batch_size=4,
        log_samples=False,
    )
    texts = [r["text"] for r in load_split(suite, "math", "test")]
    nll, _ = text_nll(model, tok, texts, lm_eval_convention=True)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(t.split()) for t in texts)  # lm-eval's count_words: re.split(r"\s+")
    scores = res.scores[task]
    assert scores["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert scores["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert scores["word_perplexity"] == pytest.approx(math.exp(nll / n_words), rel=1e-4)
    # the claims' metric differs only by the extra BOS → BOS token lm-eval also scores
    own, count = text_nll(model, tok, texts)
    assert own < nll and count == sum(len(tok(t)["input_ids"]) - 1 for t in texts)


def test_bora_sweep_through_the_cli(tiny_pool, tmp_path):
    """Two cells (method.task=add,color) of one τ: the second reuses the training."""
    runs = tmp_path / "runs"
    data = tmp_path / "data"
    data.mkdir()
    texts = {"add": ["1+2=3", "2+2=4", "3+1=4", "0+4=4"], "color": ["sky is blue", "sun is gold"]}
    for name, items in texts.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
    tasks = ",".join(f"{n}:{{jsonl:'{data / n}.jsonl'}}" for n in texts)
    cmd = [
        shutil.which("mergelab") or "mergelab",
        "--config-dir",
        str(tiny_pool["conf"]),
        "-m",
        "model=tiny",
        "task=tiny",
        f"runs_dir={runs}",
        "method=bora",
        f"method.tasks={{{tasks}}}",
        "method.task=add,color",
        "method.tau=10",
        "method.steps=4",
        "method.batch_size=2",
        "method.r=2",
        "method.target_modules=[q_proj,v_proj]",
        "eval.batch_size=16",
    ]
    env = {**os.environ, "WANDB_SILENT": "true", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    by_task = {r["method"]["report"]["task"]: r for r in recs}
    assert set(by_task) == {"add", "color"}
    hits = sorted(r["method"]["report"]["cache"]["hit"] for r in recs)
    assert hits == [False, True]
    assert by_task["add"]["weights_sha256"] != by_task["color"]["weights_sha256"]
    rep = by_task["add"]["method"]["report"]
    assert rep["tasks"]["add"]["n_train"] == 4 and rep["tasks"]["color"]["n_train"] == 2
    assert all(r["scores"] for r in recs)
