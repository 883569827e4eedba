"""Peer oracles: import guards for mergekit / fusion-bench and tiny LLaMA-shaped pools.

The peers are installed only from ``requirements-peers.lock`` (see its header). A test
that needs a peer requests the ``mergekit`` or ``fusion_bench`` fixture; the fixture skips
the test, naming the missing module and the install command, only when the peer cannot be
imported (``ImportError``). Any other failure while importing a peer is an error, not a
skip, so a broken peer install cannot silently turn the oracle off.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import SimpleNamespace

import pytest
from _peer_pool import make_pool

INSTALL_HINT = "pip install --no-deps -r requirements-peers.lock"


def _import_all(peer: str, modules: dict[str, str]) -> SimpleNamespace:
    """Import ``modules`` (alias → module); skip the test only if one is not importable."""
    loaded = {}
    for alias, name in modules.items():
        try:
            loaded[alias] = importlib.import_module(name)
        except ImportError as e:
            pytest.skip(f"{peer} is not importable ({name}: {e}); install it with {INSTALL_HINT}")
    return SimpleNamespace(**loaded)


@pytest.fixture(scope="session")
def mergekit() -> SimpleNamespace:
    """mergekit 0.1.5's tensor-level API (``merge_tensors``, ``sparsify``)."""
    ns = _import_all(
        "mergekit", {"merge_methods": "mergekit.merge_methods", "sparsify": "mergekit.sparsify"}
    )
    import mergekit as mk

    version = getattr(mk, "__version__", None) or importlib.metadata.version("mergekit")
    assert version == "0.1.5", (
        f"the oracle tests were written against mergekit 0.1.5, got {version}"
    )
    return ns


@pytest.fixture(scope="session")
def fusion_bench() -> SimpleNamespace:
    """fusion-bench 0.2.33's tensor-level functions (TIES utils, TALL masks, DARE, ...)."""
    ns = _import_all(
        "fusion-bench",
        {
            "ties_utils": "fusion_bench.method.ties_merging.ties_merging_utils",
            "simple_average": "fusion_bench.method.simple_average",
            "task_arithmetic": "fusion_bench.method.task_arithmetic.task_arithmetic",
            "dare_utils": "fusion_bench.method.dare.utils",
            "slerp_utils": "fusion_bench.method.slerp.slerp_utils",
            "tall_mask_utils": "fusion_bench.method.tall_mask.utils",
        },
    )
    version = importlib.metadata.version("fusion-bench")
    assert version == "0.2.33", (
        f"the oracle tests were written against fusion-bench 0.2.33, got {version}"
    )
    return ns


@pytest.fixture(scope="module")
def mk_sce(mergekit):
    """mergekit 0.1.5's SCE helpers (the version is checked by the ``mergekit`` fixture)."""
    return _import_all("mergekit", {"sce": "mergekit.merge_methods.sce"}).sce


@pytest.fixture(scope="module")
def fb_new(fusion_bench):
    """fusion-bench 0.2.33's TSVM, Iso-C/CTS and EMR helpers (version checked upstream)."""
    return _import_all(
        "fusion-bench",
        {
            "tsvm": "fusion_bench.method.task_singular_vector.utils.TSVM_utils",
            "iso": "fusion_bench.method.isotropic_merging.iso_utils",
            "emr": "fusion_bench.method.emr_merging.utils",
        },
    )


@pytest.fixture(scope="module")
def fb(fusion_bench) -> SimpleNamespace:
    """fusion-bench's RegMean / RegMean++ / Fisher modules (version checked upstream)."""
    return _import_all(
        "fusion-bench",
        {
            "regmean": "fusion_bench.method.regmean.regmean",
            "regmean_pp": "fusion_bench.method.regmean_plusplus.regmean_plusplus",
            "fisher": "fusion_bench.method.fisher_merging.fisher_merging",
        },
    )


@pytest.fixture(scope="module")
def pool3():
    """Base and three experts."""
    return make_pool(0, 3)
