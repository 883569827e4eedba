"""Compose the project's own Hydra configs (conf/) in a test, with mergelab's resolvers."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from harness.resolvers import register

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose(*overrides: str, hydra: bool = False) -> DictConfig:
    """``conf/config.yaml`` with ``overrides``; ``hydra=True`` keeps the ``hydra`` node
    (sweeper params). Resolvers are registered, nothing is resolved until accessed."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra)
