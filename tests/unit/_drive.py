"""Drive a merge plugin over in-memory tensors the way the streaming executor does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from methods.base import MergeMethod


def drive(
    method: MergeMethod,
    base: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    seed: int = 0,
    order: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """setup → for each statistics pass: observe every tensor, end_pass → merge_tensor.

    ``base`` maps tensor name → base tensor; ``experts`` maps expert name → (tensor name →
    tensor). ``order`` is the tensor order used in every pass (default: ``base``'s order).
    """
    names = list(order) if order is not None else list(base)
    method.setup(list(experts), seed)

    def per_expert(name: str) -> dict[str, Tensor]:
        return {e: tensors[name] for e, tensors in experts.items()}

    for i in range(method.stat_passes):
        for name in names:
            method.observe(i, name, base[name], per_expert(name))
        method.end_pass(i)
    return {name: method.merge_tensor(name, base[name], per_expert(name)) for name in names}


def instantiate_conf(method_name: str, **overrides: object) -> MergeMethod:
    """Instantiate ``conf/method/<method_name>.yaml`` through Hydra (with overrides)."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[2] / "conf" / "method" / f"{method_name}.yaml"
    cfg = OmegaConf.merge(OmegaConf.load(path), overrides)
    return instantiate(cfg)


def instantiate_overrides(overrides: Sequence[str]) -> MergeMethod:
    """``cfg.method`` composed from ``conf/config.yaml`` with command-line ``overrides``
    (config groups and defaults lists included, as ``mergelab`` composes it)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return instantiate(cfg.method)
