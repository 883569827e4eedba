"""OmegaConf resolvers that name built-in assets, and the resolution of those names.

Resolvers return *logical names*, never cache paths, and build nothing, so composing a
config (``--cfg job``, ``dry_run=true``) is instant and a cell's id does not depend on
where the cache or the checkout lives:

- ``${zoo:xs,base}`` / ``${zoo:xs,math}`` / ``${zoo:xs,lora/math}`` (optional third
  argument: the zoo's seed, default 0) → ``zoo:<zoo id>/<member>``
  (:func:`harness.zoo.member_uri`); the model pool resolves it, building the zoo on first use;
- ``${suite_dir:0}`` → ``suite:v<version>-seed0``, the generated suite's lm-eval task
  directory;
- ``${lm_eval_tasks:}`` → ``mergelab:evals/tasks``, mergelab's own lm-eval task YAMLs
  (sandboxed HumanEval and MBPP).

:func:`resolve_include_path` turns the last two (or plain directories) into directories
for lm-eval; the runner calls it before validating task names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

_SUITE = re.compile(r"^suite:v(?P<version>[^-]+)-seed(?P<seed>\d+)$")
_PACKAGE_TASKS = "mergelab:evals/tasks"


def _zoo(size: str, member: str, seed: int = 0) -> str:
    from harness.zoo import member_uri

    return member_uri(str(size), str(member), int(seed))


def _suite_dir(seed: int = 0) -> str:
    from evals.suite.build import SUITE_VERSION

    return f"suite:v{SUITE_VERSION}-seed{int(seed)}"


def _lm_eval_tasks() -> str:
    return _PACKAGE_TASKS


def lm_eval_tasks_dir() -> Path:
    """The directory of mergelab's own lm-eval task YAMLs (``evals/tasks``)."""
    from evals.code_benchmarks import __file__ as code_benchmarks_file

    return Path(code_benchmarks_file).resolve().parent / "tasks"


def resolve_include_path(value: str | Sequence[str] | None) -> str | list[str] | None:
    """lm-eval ``include_path`` entries with ``suite:``/``mergelab:`` names made directories
    (building the suite on first use); other entries are returned unchanged."""
    if value is None:
        return None
    if not isinstance(value, str):
        return [str(resolve_include_path(v)) for v in value]
    if value == _PACKAGE_TASKS:
        return str(lm_eval_tasks_dir())
    match = _SUITE.match(value)
    if not match:
        return value
    from evals.suite.build import SUITE_VERSION, build_suite, default_suite_dir

    if match["version"] != SUITE_VERSION:
        raise ValueError(
            f"task.include_path {value!r} names suite version {match['version']}, but this "
            f"mergelab generates version {SUITE_VERSION}; write ${{suite_dir:{match['seed']}}}"
        )
    seed = int(match["seed"])
    return str(build_suite(default_suite_dir(seed), seed=seed) / "tasks")


def register() -> None:
    """Register the resolvers (idempotent)."""
    OmegaConf.register_new_resolver("zoo", _zoo, replace=True)
    OmegaConf.register_new_resolver("suite_dir", _suite_dir, replace=True)
    OmegaConf.register_new_resolver("lm_eval_tasks", _lm_eval_tasks, replace=True)
