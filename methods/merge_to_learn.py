"""Merge to Learn (Morrison et al. 2024, arXiv 2410.12937): add a skill to a general
model by training on the skill alone and merging ("parallel train then merge", PTM),
against continued fine-tuning (CFT) and retraining (RT).

Models (θpre = the pool's base, ``ctx.build_model("base")``):

- θG: θpre fully fine-tuned on the general mix G (``general_data``), or, with
  ``general_from: <expert>``, that pool expert as it is (e.g. a published general model);
- θDk: θpre fine-tuned on skill k's data Dk alone (``skills``: name → data spec); τk = θDk − θpre;
- θCFT: θG fine-tuned further on D = ∪k Dk;
- θRT: θpre fine-tuned on G ∪ D.

Procedures (``procedure``), all pure tensor functions below:

- ``general``: θG (the reference the skill is added to);
- ``cft``: θCFT;  ``rt``: θRT;
- ``ptm``: θG + Σk ωk τk (task arithmetic; one skill: θG + ω τD);
- ``linear``: (1 − Σk ωk) θG + Σk ωk θDk (one skill: (1 − ω) θG + ω θD);
- ``wise_ft``: (1 − ω) θG + ω θCFT (one ω: there is one θCFT, trained on the union D).

``omega``: a number (every skill), a mapping skill → number or ``"heuristic"``, or
``"heuristic"``: ωk = |Dk| / |G| counted in training examples (texts), the paper's rule
for when no held-out data is available (for ``wise_ft``, |D| / |G| with D the union). ω
must be ≥ 0; it is validated for every procedure but only used by the merging ones
(``report()`` gives ``omega: null`` otherwise). Nothing clips ω to [0, 1].

Training (``core.train.finetune``, full fine-tuning as in the paper): AdamW (no
weight decay), ``epochs`` passes (paper 2) as ceil(epochs·|data| / batch_size) optimizer
steps over shuffled epochs, linear warm-up over ``warmup`` (paper 3 %) then linear decay
to 0 (``schedule``; open-instruct's), gradient clipping at 1.0, next-token loss on every
non-padding token of ``prompt + target`` texts truncated to ``max_length`` tokens. Each
text gets ``text_suffix`` appended when it does not already end with it (default ``"\\n"``,
the xs zoo's convention, so the model learns to stop where the suite's generation tasks
stop; ``null`` leaves texts unchanged). ``lr`` default 1e-3, not the paper's 2e-5: 2e-5
is tuned for full fine-tuning of 7B models over thousands of steps; the xs zoo's own
experts are fine-tuned from the same base at 1e-3 with batch 64 for 200 steps
(``harness/zoo.py``, ``Recipe.expert_lr``), the order of this budget (θG 183 steps, θD 63
for safety), and the tiny-Llama claims test (tests/e2e/test_merge_to_learn_claims.py)
shows PTM's trends at 1e-3. Not tuned on the xs zoo itself. ``batch_size`` 64 and
``max_length`` 64 are also the zoo's. ``seed`` (default: the run seed) seeds the batch
order. Training runs on ``ctx.device`` in the dtype ``ctx.build_model`` gives (the pool's
``dtype``).

Caching: every trained model goes through ``core.train.cached_training`` under
``ctx.cache_dir`` (the runner's ``<runs_dir>/.train_cache``). The recipe hashes what
decides the weights: the initial weights (sha256 of θpre's tensors, or of the expert
given as θG; θCFT names θG's recipe), the tokenizer's vocabulary, the training texts
(sha256, count and their specs), every hyperparameter above, the seed and the device
type, but not the component's role or skill name. So θG is trained once and shared by
every procedure and ω, θDk once per skill, and a sweep over ω trains nothing new; an
interrupted training resumes from its checkpoint (``checkpoint_every`` steps; 0 = none).
Loss curves go to ``ctx.log`` as ``train/<component>/{loss,lr,tokens}`` with the step
counted across the components trained in this cell (W&B needs increasing steps).

Cost: ``report()["components"]`` gives each needed component's training cost (steps,
tokens, examples = steps × batch_size, wall seconds; ``reused: true`` when it came from
the cache — its cost is still that of its training) and ``report()["cost"]`` the cost
attributable to the procedure, taking θG as already existing (the paper's framing):
``general`` 0; ``cft`` and ``wise_ft`` θCFT (|D| steps); ``rt`` θRT (|G| + |D|);
``ptm`` and ``linear`` Σk θDk (|Dk| each). ``general_cost`` is θG's own, for reference.

Merging: ``merge_tensor(name, base, experts)`` ignores the pool's experts (except the
``general_from`` one) and combines the trained models' value of ``name`` (read lazily
from their safetensors) with ``base`` = θpre. The trained models must hold every merged
tensor of the pool (they do when the pool's base is their architecture); trained tensors
the pool does not merge (``model.exclude``) stay θpre's, and ``fit`` warns naming them,
so keep ``exclude: []`` for this method.

Pool members: the pool needs no experts (``uses_experts = False``; ``general_from`` names
one when θG is given). Every trained model is a full HF checkpoint (weights, config,
tokenizer) in its cache entry, listed in ``report()["members"]`` (component → directory),
so θG, θDk, θCFT and θRT are pool members for any later merge:
``model.experts.<name>.path=<dir>``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.fingerprints import texts_fingerprint, tokenizer_fingerprint, weights_fingerprint
from core.options import check_choice, check_finite, check_int
from core.train import (
    SCHEDULES,
    cached_training,
    finetune,
    is_cached,
    read_stats,
    recipe_key,
    steps_for,
)
from methods.base import FitContext, MergeMethod

PROCEDURES = ("general", "cft", "rt", "ptm", "linear", "wise_ft")
MERGING = ("ptm", "linear", "wise_ft")
DEFAULT_GENERAL_DATA = ({"suite": "knowledge"}, {"suite": "math"}, {"suite": "general", "n": 2000})
DEFAULT_SKILLS = {"safety": {"suite": "safety"}}
DATA_SOURCES = ("suite", "jsonl", "hf")  # harness/data.py's source keys
RECIPE_VERSION = 1  # bump when training changes in a way the recipe does not capture

# The components each procedure needs ("skill/<k>" stands for every skill).
NEEDS = {
    "general": ("general",),
    "cft": ("general", "cft"),
    "rt": ("rt",),
    "ptm": ("general", "skill"),
    "linear": ("general", "skill"),
    "wise_ft": ("general", "cft"),
}


# --------------------------------------------------------------------------- pure functions


def ptm_merge(
    general: Tensor, pre: Tensor, skills: Sequence[Tensor], omegas: Sequence[float]
) -> Tensor:
    """θG + Σk ωk (θDk − θpre)."""
    out = general.clone()
    for theta, w in zip(skills, omegas, strict=True):
        out.add_(theta - pre, alpha=float(w))
    return out


def linear_merge(general: Tensor, skills: Sequence[Tensor], omegas: Sequence[float]) -> Tensor:
    """(1 − Σk ωk) θG + Σk ωk θDk."""
    out = general * (1.0 - float(sum(omegas)))
    for theta, w in zip(skills, omegas, strict=True):
        out.add_(theta, alpha=float(w))
    return out


def wise_ft_merge(general: Tensor, cft: Tensor, omega: float) -> Tensor:
    """(1 − ω) θG + ω θCFT."""
    return general * (1.0 - float(omega)) + cft * float(omega)


def heuristic_omega(n_skill: int, n_general: int) -> float:
    """The paper's data-size rule ω = |D| / |G| (training examples)."""
    if n_general <= 0:
        raise ValueError("heuristic omega needs a non-empty general mix (|G| > 0)")
    return n_skill / n_general


def resolve_omegas(
    omega: float | str | Mapping[str, float | str], sizes: Mapping[str, int], n_general: int
) -> dict[str, float]:
    """ω per skill from the ``omega`` option (number, ``"heuristic"`` or a mapping)."""
    per = omega if isinstance(omega, Mapping) else {k: omega for k in sizes}
    return {
        k: heuristic_omega(sizes[k], n_general) if per[k] == "heuristic" else float(per[k])
        for k in sizes
    }


# --------------------------------------------------------------------------- the plugin


def _plain(value: Any) -> Any:
    """Hydra's DictConfig / ListConfig → plain dicts and lists (JSON-friendly)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _check_spec(spec: Any, what: str) -> dict[str, Any]:
    """A data spec with its null-valued keys dropped (so a config can switch a spec's
    source by merging: ``{suite: null, jsonl: path}``)."""
    if isinstance(spec, Mapping):
        spec = {k: v for k, v in spec.items() if v is not None}
    if not isinstance(spec, Mapping) or sum(k in spec for k in DATA_SOURCES) != 1:
        raise ValueError(
            f"{what} must be a data spec with exactly one of {list(DATA_SOURCES)} "
            f"(e.g. {{suite: safety}}), got {spec!r}"
        )
    return dict(spec)


def _check_omega(value: Any, what: str) -> float | str:
    if value == "heuristic":
        return "heuristic"
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError(f"{what} must be a number >= 0 or 'heuristic', got {value!r}")
    v = check_finite(value, what)
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


class MergeToLearn(MergeMethod):
    """Plugin: train what ``procedure`` needs (cached), then combine per tensor.

    Options (see the module docstring for every decision): ``procedure`` (general | cft |
    rt | ptm | linear | wise_ft), ``general_data`` (list of data specs), ``skills`` (name →
    data spec), ``omega`` (number, mapping per skill, or "heuristic"), ``epochs``, ``lr``,
    ``warmup``, ``schedule`` (linear | constant), ``batch_size``, ``max_length``, ``seed``
    (null = run seed), ``text_suffix``, ``general_from`` (null, or a pool expert used as θG),
    ``checkpoint_every`` (steps; 0 = no checkpoints), ``progress``.
    """

    name = "merge_to_learn"
    needs_data = True
    needs_calibration = False  # trains on its own data specs, scored on any tasks
    uses_experts = False  # trains from the base; only ``general_from`` names an expert

    def __init__(
        self,
        procedure: str = "ptm",
        general_data: Sequence[Mapping[str, Any]] | None = None,
        skills: Mapping[str, Mapping[str, Any]] | None = None,
        omega: float | str | Mapping[str, float | str] = "heuristic",
        epochs: float = 2.0,
        lr: float = 1e-3,
        warmup: float = 0.03,
        schedule: str = "linear",
        batch_size: int = 64,
        max_length: int = 64,
        seed: int | None = None,
        text_suffix: str | None = "\n",
        general_from: str | None = None,
        checkpoint_every: int = 100,
        progress: bool = True,
    ) -> None:
        self.procedure = check_choice(procedure, "method.procedure", PROCEDURES)
        general_data = _plain(list(DEFAULT_GENERAL_DATA) if general_data is None else general_data)
        if not isinstance(general_data, list) or not general_data:
            raise ValueError(
                f"method.general_data must be a non-empty list of data specs, got {general_data!r}"
            )
        self.general_data = [
            _check_spec(s, f"method.general_data[{i}]") for i, s in enumerate(general_data)
        ]
        skills = _plain(DEFAULT_SKILLS if skills is None else skills)
        if not isinstance(skills, dict) or not skills:
            raise ValueError(
                f"method.skills must be a non-empty mapping name → data spec, got {skills!r}"
            )
        self.skills = {k: _check_spec(s, f"method.skills.{k}") for k, s in skills.items()}
        omega = _plain(omega)
        if isinstance(omega, dict):
            unknown, missing = (
                sorted(set(omega) - set(self.skills)),
                sorted(set(self.skills) - set(omega)),
            )
            if unknown or missing:
                raise ValueError(
                    f"method.omega names skills {sorted(omega)} but method.skills has "
                    f"{sorted(self.skills)} (unknown {unknown}, missing {missing})"
                )
            self.omega: Any = {k: _check_omega(v, f"method.omega.{k}") for k, v in omega.items()}
            if self.procedure == "wise_ft" and len(set(self.omega.values())) > 1:
                raise ValueError(
                    "method.omega must be one value for procedure wise_ft (one θCFT trained on "
                    f"all skills), got {self.omega}"
                )
        else:
            self.omega = _check_omega(omega, "method.omega")
        self.epochs = check_finite(epochs, "method.epochs")
        if self.epochs <= 0:
            raise ValueError(f"method.epochs must be > 0, got {epochs}")
        self.lr = check_finite(lr, "method.lr")
        if self.lr <= 0:
            raise ValueError(f"method.lr must be > 0, got {lr}")
        self.warmup = check_finite(warmup, "method.warmup")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"method.warmup must be in [0, 1], got {warmup}")
        self.schedule = check_choice(schedule, "method.schedule", SCHEDULES)
        self.batch_size = check_int(batch_size, "method.batch_size", 1)
        self.max_length = check_int(max_length, "method.max_length", 1)
        self.seed_option = None if seed is None else check_int(seed, "method.seed")
        if text_suffix is not None and not isinstance(text_suffix, str):
            raise ValueError(f"method.text_suffix must be a string or null, got {text_suffix!r}")
        self.text_suffix = text_suffix
        if general_from is not None and not isinstance(general_from, str):
            raise ValueError(
                f"method.general_from must be an expert name or null, got {general_from!r}"
            )
        self.general_from = general_from
        self.checkpoint_every = check_int(checkpoint_every, "method.checkpoint_every", 0)
        self.progress = bool(progress)
        self._sources: dict[str, Any] = {}
        self._report: dict[str, Any] = {}
        self.omegas: dict[str, float] | None = None

    # ------------------------------------------------------------------ fit

    def fit(self, ctx: FitContext) -> None:
        if ctx.cache_dir is None:
            raise ValueError(
                "merge_to_learn trains models and needs FitContext.cache_dir (the runner sets "
                "<runs_dir>/.train_cache)"
            )
        if self.general_from is not None and self.general_from not in ctx.expert_names:
            raise ValueError(
                f"method.general_from names {self.general_from!r}, which is not a pool expert "
                f"{ctx.expert_names}"
            )
        load = ctx.load_texts
        if load is None:
            raise ValueError(
                f"{type(self).__name__} trains on texts: its FitContext needs load_texts "
                "(the runner passes harness.data.load_texts)"
            )
        self._ctx = ctx
        self._seed = ctx.seed if self.seed_option is None else self.seed_option
        self._log_offset = 0

        general = self._texts(load, self.general_data, "method.general_data")
        skills = {
            k: self._texts(load, [spec], f"method.skills.{k}") for k, spec in self.skills.items()
        }
        union = [t for texts in skills.values() for t in texts]
        sizes = {k: len(v) for k, v in skills.items()}
        if self.procedure == "wise_ft":
            w = self.omega if not isinstance(self.omega, dict) else next(iter(self.omega.values()))
            value = heuristic_omega(len(union), len(general)) if w == "heuristic" else float(w)
            self.omegas = {k: value for k in skills}
        else:
            self.omegas = resolve_omegas(self.omega, sizes, len(general))

        pre = ctx.build_model("base")
        pre_init = {"weights_sha256": weights_fingerprint(pre)}
        del pre
        needs = NEEDS[self.procedure]
        specs_all = self.general_data + list(self.skills.values())
        comps: dict[str, dict[str, Any]] = {}
        general_init: dict[str, Any] | None = None
        if "general" in needs or "cft" in needs:
            if self.general_from is not None:
                theta_g = ctx.build_model(self.general_from)
                general_init = {"weights_sha256": weights_fingerprint(theta_g)}
                del theta_g
                comps["general"] = {
                    "pool_expert": self.general_from,
                    "steps": 0,
                    "tokens": 0,
                    "examples": 0,
                    "seconds": 0.0,
                    "reused": True,
                }
            else:
                comps["general"] = self._train(
                    "general", pre_init, "base", general, self.general_data
                )
                general_init = {"recipe": comps["general"]["key"]}
        if "skill" in needs:
            for k, texts in skills.items():
                comps[f"skill/{k}"] = self._train(
                    f"skill/{k}", pre_init, "base", texts, [self.skills[k]]
                )
        if "cft" in needs:
            assert general_init is not None
            start = self.general_from or Path(comps["general"]["path"])
            comps["cft"] = self._train(
                "cft", general_init, start, union, list(self.skills.values())
            )
        if "rt" in needs:
            comps["rt"] = self._train("rt", pre_init, "base", general + union, specs_all)

        self._open_sources(ctx, comps)
        attributable = {
            "general": [],
            "cft": ["cft"],
            "wise_ft": ["cft"],
            "rt": ["rt"],
            "ptm": [f"skill/{k}" for k in skills],
            "linear": [f"skill/{k}" for k in skills],
        }[self.procedure]
        cost = {
            m: sum(comps[c][m] for c in attributable)
            for m in ("steps", "tokens", "examples", "seconds")
        }
        merging = self.procedure in MERGING
        self._report = {
            "procedure": self.procedure,
            "omega": dict(self.omegas) if merging else None,
            "omega_option": self.omega,  # as given: number, mapping or "heuristic"
            "examples": {"general": len(general), "skills": sizes},
            "general_from": self.general_from,
            "seed": self._seed,
            "components": {
                k: {m: v for m, v in c.items() if m != "losses"} for k, c in comps.items()
            },
            "members": {k: c["path"] for k, c in comps.items() if c.get("path")},
            "cost": {**cost, "components": attributable},
            "general_cost": (
                {m: comps["general"][m] for m in ("steps", "tokens", "examples", "seconds")}
                if "general" in comps
                else None
            ),
        }

    def _texts(self, load: Callable, specs: Sequence[Mapping[str, Any]], what: str) -> list[str]:
        out: list[str] = []
        for spec in specs:
            try:
                texts = list(load(spec))
            except (ValueError, FileNotFoundError) as exc:
                raise ValueError(f"{what}: {exc}") from exc
            out += texts
        sfx = self.text_suffix
        return [t if not sfx or t.endswith(sfx) else t + sfx for t in out]

    def _train(
        self,
        component: str,
        init: Mapping[str, Any],
        start: str | Path,
        texts: list[str],
        specs: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Train (or reuse) one component from ``start`` ("base", a pool expert or a cached
        model dir) on ``texts``; its cache entry and cost."""
        ctx = self._ctx
        steps = steps_for(self.epochs, len(texts), self.batch_size)
        recipe = {
            "trainer": "core.train.finetune",
            "version": RECIPE_VERSION,
            "init": dict(init),
            "tokenizer_sha256": tokenizer_fingerprint(ctx.tokenizer),
            "data": {
                "specs": list(specs),
                "n": len(texts),
                "sha256": texts_fingerprint(texts),
                "text_suffix": self.text_suffix,
            },
            "steps": steps,
            "epochs": self.epochs,
            "lr": self.lr,
            "warmup": self.warmup,
            "schedule": self.schedule,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "shuffle": True,
            "seed": self._seed,
            "device_type": torch.device(ctx.device).type,
        }
        reused = is_cached(ctx.cache_dir, recipe)
        offset = self._log_offset

        def log(metrics: dict[str, float], step: int) -> None:
            ctx.log({f"train/{component}/{k}": v for k, v in metrics.items()}, offset + step)

        def train(out_dir: Path, checkpoint_dir: Path):
            model = self._start_model(start)
            stats = finetune(
                model,
                ctx.tokenizer,
                texts,
                steps=steps,
                lr=self.lr,
                batch_size=self.batch_size,
                max_length=self.max_length,
                warmup=self.warmup,
                seed=self._seed,
                device=ctx.device,
                progress=self.progress,
                desc=f"merge_to_learn: {component}",
                schedule=self.schedule,
                shuffle=True,
                log=log,
                checkpoint_dir=checkpoint_dir if self.checkpoint_every else None,
                checkpoint_every=self.checkpoint_every,
            )
            model.save_pretrained(out_dir)
            if hasattr(ctx.tokenizer, "save_pretrained"):
                ctx.tokenizer.save_pretrained(out_dir)
            return stats

        path = cached_training(ctx.cache_dir, recipe, train)
        if not reused:
            self._log_offset += steps
        stats = read_stats(path)
        losses = stats.get("losses") or [None]
        return {
            "path": str(path),
            "key": recipe_key(recipe),
            "reused": reused,
            "steps": stats["steps"],
            "tokens": stats["tokens"],
            "examples": stats.get("examples", stats["steps"] * self.batch_size),
            "seconds": round(float(stats["seconds"]), 3),
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }

    def _start_model(self, start: str | Path) -> torch.nn.Module:
        """A fresh model holding ``start``'s weights, for training."""
        ctx = self._ctx
        if isinstance(start, str):
            model = ctx.build_model(start)
        else:
            from core.sources import CheckpointSource

            model = ctx.build_model("base")
            src = CheckpointSource(start)
            params = dict(model.state_dict())
            state = {n: src.get(n).to(params[n].device, params[n].dtype) for n in src.names}
            result = model.load_state_dict(state, strict=False)
            loaded = {params[k].data_ptr() for k in state if k in params}
            untied = [k for k in result.missing_keys if params[k].data_ptr() not in loaded]
            if result.unexpected_keys or untied:
                raise ValueError(
                    f"cached model {start} does not match the base model "
                    f"(unexpected {result.unexpected_keys[:5]}, missing {untied[:5]})"
                )
        model.requires_grad_(True)
        return model

    def _open_sources(self, ctx: FitContext, comps: Mapping[str, Mapping[str, Any]]) -> None:
        from core.sources import CheckpointSource

        self._sources = {
            name: CheckpointSource(Path(c["path"])) for name, c in comps.items() if "path" in c
        }
        wanted = set(ctx.tensor_names)
        for name, src in self._sources.items():
            missing = sorted(wanted - set(src.names))
            if missing:
                raise ValueError(
                    f"trained model {name!r} ({src.directory}) lacks merged tensors "
                    f"{missing[:8]}: is the pool's base the architecture it was trained from?"
                )
            kept = sorted(n for n in set(src.names) - wanted if src.dtype(n).is_floating_point)
            if kept:
                warnings.warn(
                    f"merge_to_learn: tensors {kept[:8]} of the trained {name!r} are not merged "
                    "by the pool (model.exclude?) and stay θpre's; use exclude: [] for this method",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ merge

    def _get(self, component: str, name: str, like: Tensor) -> Tensor:
        return self._sources[component].get(name).to(device=like.device, dtype=torch.float32)

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        if not self._report:
            raise RuntimeError("merge_to_learn.merge_tensor called before fit")
        p = self.procedure
        if p in ("cft", "rt"):
            return self._get(p, name, base)
        general = (
            experts[self.general_from].float()
            if self.general_from is not None
            else self._get("general", name, base)
        )
        if p == "general":
            return general
        if p == "wise_ft":
            omega = next(iter(self.omegas.values()))
            return wise_ft_merge(general, self._get("cft", name, base), omega)
        names = list(self.skills)
        thetas = [self._get(f"skill/{k}", name, base) for k in names]
        omegas = [self.omegas[k] for k in names]
        if p == "ptm":
            return ptm_merge(general, base, thetas, omegas)
        return linear_merge(general, thetas, omegas)

    def report(self) -> dict[str, Any]:
        return dict(self._report)
