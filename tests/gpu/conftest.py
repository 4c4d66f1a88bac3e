"""The GPU suite's switches: where it runs and on what corpus.

* CUDA present: every test runs on the GPU (``cuda`` mode).
* ``SMOE_GPU_TESTS=cpu``: the same tests rehearse on the CPU with the CPU flags of each precision
  (:mod:`gpu_helpers`). Checks that only mean something on CUDA (sync debug mode, cuBLAS, CUDA memory counters,
  NCCL) skip with their reason.
* otherwise: every test skips at its first fixture with one reason line, before any corpus is built, so
  ``pytest tests`` on a machine without CUDA spends nothing here.

The corpus: ``SMOE_TEST_CORPUS=<dir>`` names a ready one (the offline GPU bundle ships one built by
:func:`fixture_corpus.make_corpus`, since GPU nodes have no flite); else the session's flite corpus of
``tests/conftest.py`` is built. ``SMOE_GPU_RESULTS=<dir>``: the tests that measure something (peak memory, host
syncs, run times) also write their figures there as JSON, for the bundle's summary and benchmarks/README.md.
"""

import concurrent.futures
import os
import time
from pathlib import Path

import pytest
import torch

from gpu_helpers import (SKIP_REASON, TRAIN_PRECISIONS, TRAIN_UPDATES, gpu_mode, native_bf16, run, threads,
                         train_cmd)


@pytest.fixture(scope="session")
def device() -> str:
    try:
        mode = gpu_mode()
    except ValueError as e:
        raise pytest.UsageError(str(e))
    if mode is None:
        pytest.skip(SKIP_REASON)
    return mode


@pytest.fixture(autouse=True)
def _gpu_suite_switch(device):
    """Every test of the suite depends on :func:`device`, so without CUDA they all skip there, with one reason."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report the suite's skip at one place (this file), so pytest's summary folds it into one line."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and isinstance(rep.longrepr, tuple) and str(rep.longrepr[2]).endswith(SKIP_REASON):
        rep.longrepr = (__file__, _SKIP_LINE, rep.longrepr[2])


_SKIP_LINE = next(n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1)
                  if "pytest.skip(SKIP_REASON)" in line)


@pytest.fixture(scope="session")
def gpu_corpus(request, device) -> Path:
    given = os.environ.get("SMOE_TEST_CORPUS")
    if given:
        root = Path(given)
        missing = [n for n in ("config.yaml", "train.tsv", "dev.tsv", "test_asr_wb.tsv", "test_st_wb.tsv")
                   if not (root / n).is_file()]
        if missing:
            raise pytest.UsageError(f"SMOE_TEST_CORPUS={given}: no {', '.join(missing)} there (build the corpus "
                                    f"with tests/fixture_corpus.py's make_corpus)")
        return root
    return request.getfixturevalue("corpus_dir")  # tests/conftest.py: built with flite


@pytest.fixture(scope="session")
def n_gpus(device) -> int:
    return torch.cuda.device_count() if device == "cuda" else 0


@pytest.fixture(scope="session")
def trainings(device, gpu_corpus, tmp_path_factory) -> dict:
    """fairseq-train in each mixed precision (:data:`TRAIN_PRECISIONS`), :data:`TRAIN_UPDATES` updates, validated
    at the end. On a GPU the three share it at once (an _xs model leaves it mostly idle); on the CPU rehearsal they
    run one after another. Returns ``{precision: (returncode, log, save_dir, seconds)}``: each test judges its own
(bf16 only where the GPU has bf16 hardware)."""
    work = tmp_path_factory.mktemp("train")

    def one(precision):
        start = time.monotonic()
        save_dir = work / precision
        rc, log = run(train_cmd(device, gpu_corpus, save_dir, precision, TRAIN_UPDATES), cwd=work,
                      n_threads=threads(device), check=False)
        return precision, (rc, log, save_dir, time.monotonic() - start)

    precisions = [p for p in TRAIN_PRECISIONS if p != "bf16" or native_bf16(device)]
    with concurrent.futures.ThreadPoolExecutor(len(precisions) if device == "cuda" else 1) as pool:
        return dict(pool.map(one, precisions))


@pytest.fixture(scope="session")
def checkpoint(trainings) -> Path:
    """The ``--amp`` run's best checkpoint (fp32 weights), which the decoding tests use."""
    rc, log, save_dir, _ = trainings["amp"]
    assert rc == 0, f"the --amp training the decoding tests use failed:\n{log[-4000:]}"
    return save_dir / "checkpoint_best.pt"
