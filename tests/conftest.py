"""Test-session setup: each pytest-xdist worker runs on its own CPU cores.

MindSpore's CPU runtime keeps a pool of threads per process sized to the machine; with two workers
on a 2-core machine the pools oversubscribe the cores and spin against each other (two concurrent
runs of tests/test_samplers.py: 190 s unpinned, 64 s with each on its own core). Pinning each
worker to its share of the cores (inherited by the commands and msrun jobs the tests start) keeps
the runs from slowing each other. A run without xdist is left as it is.
"""

import os

import pytest


def pytest_configure(config):
    workerinput = getattr(config, "workerinput", None)  # set in xdist workers only
    if workerinput is None or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    count, index = int(workerinput["workercount"]), int(workerinput["workerid"][2:])
    share = [core for i, core in enumerate(cores) if i % count == index]
    if share:
        os.sched_setaffinity(0, share)


# The files that take longest (measured: `pytest -n 2 --dist loadfile --durations=30`), run first: with
# one file per worker at a time, a long file started last (the notebook: 2.5 min) leaves the other
# worker idle at the end. Longest-first keeps both busy until the run is nearly over. (xdist's own
# order, by number of tests, puts the 2-test notebook file last: the README's command passes
# --no-loadscope-reorder so that this order is used.)
LONGEST_FIRST = ("test_notebook.py", "test_distributed.py", "test_crash_resume.py", "test_train.py",
                 "test_watch.py", "test_kernels.py", "test_ir_guard.py", "test_float16.py", "test_msrun_failures.py",
                 "test_conditional.py", "test_export.py", "test_samplers.py", "test_cli.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.fixture(scope="module")
def graph_mode_module():
    """MindSpore's graph mode for a whole test module (``pytestmark = pytest.mark.usefixtures(...)``),
    the previous mode restored after it."""
    import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)
    import mindspore as ms
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)
