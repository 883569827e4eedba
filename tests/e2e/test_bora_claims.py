"""BoRA's checkable claims (2407.15857) on a tiny multi-task set, through the plugin, each
a paired test over three training seeds with a verdict.

Set-up: a tiny random Llama (tests/helpers/tiny_lm, character tokenizer) and four tasks
with distinct formats and unequal sizes (8, 24, 72, 216 training texts) that share one
world: a lexicon of made-up words and a fixed word → partner map, written by each task in
its own format ("Q: kalo? A: tesu.", "kalo -> tesu", ...). The small tasks see a few words
only; sharing with the big ones teaches them the rest, while a single shared adapter must
also spread its first-token guess over every format, weighted by data size.

For every τ of the paper's grid (0, 1, 10, 100, 1000, 10⁴) and ``shared``, and each of
three training seeds, one BoRA training (LoRA r = 4 on every projection and the head, 200
steps, 8 texts per task per step, lr 5e-3 constant) through ``BoRA.fit`` — the other three
tasks' cells hit the cache, as in a sweep over ``method.task`` —; each task's merged model
is scored on 60 held-out texts of its own task: per text, its log-likelihood and token
count, so a perplexity is exp(−Σ ll / Σ tokens) (lm-eval's ``weighted_perplexity``).

Claims (τ* = 100, the paper's best, fixed in advance), each the two-level bootstrap
interval over seeds and texts (:mod:`tests.helpers.claims`): the mean perplexity over tasks
is lower at τ* than at both ends of the grid (U-shape); each task is better at τ* than at
τ = 0; ‖θ_d − Θ‖ at τ* grows with the task's size; the small tasks gain most (relative
perplexity drop; the distance and gain statistics are one value per seed, so their
intervals are over seeds only). Each test asserts the measured verdict. ``slow``: 21
trainings (~5 min on a loaded 2-core machine, one thread). Not slow: the direct perplexity
checked against the suite's lm-eval ``loglikelihood_rolling`` task on one BoRA model, and
one two-cell sweep through the CLI. ``python3 -m pytest -m slow -s
tests/e2e/test_bora_claims.py`` prints the per-τ perplexities and the claims table.
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

from core.train import DEFAULT_LORA_TARGETS
from harness.data import load_texts
from methods.base import FitContext
from methods.bora import SHARED, BoRA
from tests.helpers.claims import Verdict, compare, compare_average, markdown
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


def text_items(model, tokenizer, texts) -> dict[int, tuple[float, int]]:
    """Per text: (log-likelihood in nats, scored tokens), the items of a perplexity."""
    out = {}
    for i, text in enumerate(texts):
        nll, n = text_nll(model, tokenizer, [text])
        out[i] = (-nll, n)
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Per τ and training seed: ``items`` {task: {text: (ll, tokens)}} on the held-out
    texts, ``distance`` {task: ‖θ_d − Θ‖}, ``n_train``, ``hit`` (cache hit of each task's
    cell)."""
    setup = Setup(tmp_path_factory.mktemp("bora_claims"))
    out: dict = {}
    for tau in TAUS:
        for seed in SEEDS:
            row = {"items": {}, "hit": []}
            for task in FORMATS:
                method, model = setup.cell(tau=tau, task=task, seed=seed)
                rep = method.report()
                row["hit"].append(rep["cache"]["hit"])
                row["items"][task] = text_items(model, setup.tok, TEST[task])
            row["distance"] = {t: f["distance"] for t, f in rep["tasks"].items()}
            row["n_train"] = {t: f["n_train"] for t, f in rep["tasks"].items()}
            out[tau, seed] = row
    return out


def items(sweep, tau, task) -> list[dict]:
    return [sweep[tau, s]["items"][task] for s in SEEDS]


def ppl(sweep, tau, task) -> float:
    """Test perplexity over the seeds' pooled texts (for the printed table)."""
    pairs = [v for s in SEEDS for v in sweep[tau, s]["items"][task].values()]
    return math.exp(-sum(ll for ll, _ in pairs) / sum(n for _, n in pairs))


def per_seed(sweep, fn) -> list[dict[int, float]]:
    """A per-seed statistic as one "item" per seed (the interval is then over seeds)."""
    return [{0: fn(s)} for s in SEEDS]


def seed_ppl(sweep, tau, task, seed) -> float:
    pairs = list(sweep[tau, seed]["items"][task].values())
    return math.exp(-sum(ll for ll, _ in pairs) / sum(n for _, n in pairs))


BY_SIZE = sorted(FORMATS, key=lambda t: FORMATS[t][1])  # qa (8) ... angle (216)


@pytest.fixture(scope="module")
def verdicts(sweep) -> dict[str, Verdict]:
    """Every claim as a paired interval over the 3 training seeds (τ* = 100, the paper's
    best, fixed in advance rather than picked from these runs)."""
    best, wp = 100, "weighted_perplexity"
    out = {}
    for other in (0, 10000):
        a = {t: items(sweep, best, t) for t in FORMATS}
        b = {t: items(sweep, other, t) for t in FORMATS}
        out[f"mean ppl: tau=100 < tau={other}"] = compare_average(
            f"mean ppl: tau=100 < tau={other}", a, b, direction=-1, aggregation=wp
        )
    for task in FORMATS:
        name = f"{task} ({FORMATS[task][1]} texts) ppl: tau=100 < tau=0"
        out[name] = compare(
            name, items(sweep, best, task), items(sweep, 0, task), direction=-1, aggregation=wp
        )
    for small, big in zip(BY_SIZE, BY_SIZE[1:], strict=False):
        name = f"distance at tau=100: {big} > {small}"
        out[name] = compare(
            name,
            per_seed(sweep, lambda s, t=big: sweep[best, s]["distance"][t]),
            per_seed(sweep, lambda s, t=small: sweep[best, s]["distance"][t]),
        )

    def gain(task):
        return lambda s: 1 - seed_ppl(sweep, best, task, s) / seed_ppl(sweep, 0, task, s)

    for small, big in ((BY_SIZE[0], BY_SIZE[-1]), (BY_SIZE[1], BY_SIZE[2])):
        name = f"gain at tau=100: {small} > {big}"
        out[name] = compare(name, per_seed(sweep, gain(small)), per_seed(sweep, gain(big)))
    print("\n" + "\n".join(
        f"tau={tau!s:>6} " + " ".join(f"{t}={ppl(sweep, tau, t):.3f}" for t in FORMATS)
        for tau in TAUS
    ))  # fmt: skip
    print(markdown(list(out.values())))
    return out


# claim → measured verdict (a strict xfail when "not reproduced")
EXPECTED = {
    "mean ppl: tau=100 < tau=0": "reproduced",
    "mean ppl: tau=100 < tau=10000": "reproduced",
    "qa (8 texts) ppl: tau=100 < tau=0": "reproduced",
    "arrow (24 texts) ppl: tau=100 < tau=0": "inconclusive",
    "hash (72 texts) ppl: tau=100 < tau=0": "reproduced",
    "angle (216 texts) ppl: tau=100 < tau=0": "reproduced",
    "distance at tau=100: arrow > qa": "reproduced",
    "distance at tau=100: hash > arrow": "reproduced",
    "distance at tau=100: angle > hash": "reproduced",
    "gain at tau=100: qa > angle": "reproduced",
    "gain at tau=100: arrow > hash": "inconclusive",
}


@pytest.mark.slow
def test_sweep_trains_once_per_tau(sweep):
    for row in sweep.values():
        assert row["hit"] == [False, True, True, True]
    assert all(v == 0.0 for v in sweep[SHARED, 0]["distance"].values())


@pytest.mark.slow
@pytest.mark.parametrize("claim", list(EXPECTED))
def test_claim_verdict(verdicts, claim):
    assert verdicts[claim].verdict == EXPECTED[claim], verdicts[claim]


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
