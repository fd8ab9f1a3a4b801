"""Shared fixtures (exactness tests run in float64 through ``x64``), the test order, and
JAX's persistent compilation cache for the whole run."""

import contextlib
import os
from pathlib import Path

# Set before JAX is imported, so every pytest worker and every tutorial or CLI subprocess
# (which inherit the environment) share one on-disk cache of compiled programs: the same
# driver on the same shapes, built in several tests or processes, compiles once. Entries are
# keyed by the program's fingerprint, the JAX version and the device, so a stale entry
# cannot be used. A user's own setting wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# Half of the suite's CPU time is XLA compiling small programs that then run for
# milliseconds; its cheapest backend optimisation level compiles them ~20 % faster
# (test_eb + test_handler: 170 s -> 142 s, cold cache) and changes no tolerance's outcome.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax
import pytest

# Longest files first. pytest-xdist's ``--dist loadfile`` hands whole files to the two workers
# in collection order, and collection is alphabetical, so the slow tutorial runs
# (tests/tutorials sorts after tests/test_*.py) used to start last on one worker while the
# other sat idle. Rough CPU seconds per file, cold cache (``/usr/bin/time``, ``--durations``):
# test_cli ~225 (six ``hbmeta compare --small`` runs, in one process), statistics tutorials
# ~150, neural tutorials ~100, experiments ~60, ... test_inference_data ~30 (hand-made results).
# Most of it is XLA compilation; the slow marks (``-m "not slow"``) drop the tutorials, the
# CLI's model runs and the statistical checks.
SLOW_FIRST = (
    "tests/tutorials/test_statistics_tutorials.py",
    "tests/cli/test_cli.py",
    "tests/tutorials/test_neural_tutorials.py",
    "tests/experiments/",
    "tests/infer/test_zoo_agreement.py",
    "tests/infer/test_eb.py",
    "tests/infer/test_nuts_agreement.py",
    "tests/output/test_inference_data.py",
    "tests/marginal/test_handler.py",
    "tests/models/",
)


def pytest_collection_modifyitems(session, config, items):
    """Schedule the slow files first (a stable sort: the order within a file is kept)."""

    def rank(item):
        return next((i for i, prefix in enumerate(SLOW_FIRST)
                     if item.nodeid.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)


@pytest.fixture
def compiles():
    """``with compiles() as names:`` records the function name of every XLA backend
    compilation inside the block (``jax.monitoring``), e.g. ``"jit(_chunk)"``."""

    @contextlib.contextmanager
    def record():
        names: list[str] = []

        def listener(event, duration, **kwargs):
            if "backend_compile" in event:
                names.append(str(kwargs.get("fun_name")))

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield names
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)

    return record


@pytest.fixture
def x64():
    """Compute in float64 for the duration of a test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def linear_data(x64):
    from numpyro_hbmeta.models import linear

    return linear.simulate(jax.random.PRNGKey(0), num_tasks=6, num_support=7, num_query=5)
