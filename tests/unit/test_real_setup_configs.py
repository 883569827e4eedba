"""The papers' real-setup experiment configs: they compose, every method of their sweep
instantiates under them, their task names, per-task few-shot counts and the experts' task
lists are consistent and known to lm-eval (checked against its index: nothing downloaded)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from evals.lm_eval import validate_tasks
from harness.resolvers import resolve_include_path
from methods.base import MergeMethod
from tests.helpers.hydra_conf import compose

REAL_SETUPS = {
    "metagpt_llama2_7b": {
        "winogrande": 0,
        "agieval": 5,
        "gsm8k": 4,
        "minerva_math": 4,
        "mergelab_mbpp": 3,
        "mergelab_humaneval": 0,
    },
    "metagpt_mistral_7b": None,  # same tasks as metagpt_llama2_7b
    "sens_merging_llama2_7b": None,
    "adamerging_llama2_7b": None,
    "merge_to_learn_tulu": None,
}


@pytest.fixture(scope="module")
def full_index():
    """lm-eval's built-in task index plus mergelab's own task YAMLs (built once)."""
    task = OmegaConf.to_container(compose("task=metagpt").task, resolve=True)
    return validate_tasks(["winogrande"], resolve_include_path(task["include_path"]))


@pytest.mark.parametrize("name", sorted(REAL_SETUPS))
def test_real_setup_config_is_consistent(name, full_index):
    cfg = compose(f"+experiment={name}", hydra=True)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    tasks = list(task["tasks"])
    unknown = [t for t in tasks if t not in full_index.task_index]
    assert not unknown, f"{name}: lm-eval does not know {unknown}"
    fewshot = task["num_fewshot"]
    if isinstance(fewshot, dict):
        assert set(fewshot) <= set(tasks)
    if REAL_SETUPS[name] is not None:
        assert fewshot == REAL_SETUPS[name]
    for expert, spec in cfg.model.experts.items():
        assert set(spec.tasks) <= set(tasks), f"{name}: expert {expert} names other tasks"
    assert cfg.model.trust_remote_code is False
    methods = str(cfg.hydra.sweeper.params.method).split(",")
    for method in methods:
        m = instantiate(compose(f"+experiment={name}", f"method={method}").method)
        assert isinstance(m, MergeMethod)
