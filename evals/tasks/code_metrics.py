"""lm-eval `!function` shim: lm-eval resolves functions relative to the YAML's directory."""

from evals.code_benchmarks import *  # noqa: F403
