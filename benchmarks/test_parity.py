"""Parity of every implementation (ours and the peers) against the float64 oracle on small,
odd cases, with docs/design.md's tolerances. One subprocess per implementation runs all its
cases (the Triton ones under TRITON_INTERPRET=1 on a CPU); on a CPU two of them run at a
time (each is mostly one busy thread: the interpreter, torch.compile), the interpreted
Triton one, the longest, first. Fast: this is the CI subset,
`pytest benchmarks -m parity --benchmark-disable`."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.cases import IMPLS, TRITON_IMPLS, check_errors, unavailable_reason
from benchmarks.harness import DEVICE, ON_GPU, PARITY_CASES, PARITY_IMPLS, CaseFailed, run_module

CASES = {c.id: c for c in PARITY_CASES}


def _run_parity(impl, root):
    """{case id: result} of `impl` on the parity cases it can run, from one subprocess, or
    the CaseFailed of that subprocess."""
    cases = [c for c in PARITY_CASES if unavailable_reason(impl, c, DEVICE, mode="parity") is None]
    path = root / f"{impl}.json"
    path.write_text(json.dumps([c.to_dict() for c in cases]))
    try:
        res = run_module("benchmarks.tools.run_case",
                         ["parity", "--impl", impl, "--cases", str(path), "--device", DEVICE],
                         interpret_triton=impl in TRITON_IMPLS and not ON_GPU, timeout=900)
        return {r["case_id"]: r for r in res["results"]}
    except CaseFailed as e:
        return e


@pytest.fixture(scope="session")
def parity_results(request, tmp_path_factory):
    """parity_results(impl) -> {case id: result}: one subprocess per implementation. The
    implementations that this session's selected parity tests need all start at the first
    call, two at a time on a CPU (one at a time on a GPU), the interpreted Triton ones first."""
    root = tmp_path_factory.mktemp("parity")
    wanted = {item.callspec.params["impl"] for item in request.session.items
              if item.originalname == "test_parity" and hasattr(item, "callspec")
              and unavailable_reason(item.callspec.params["impl"], CASES[item.callspec.params["case_id"]],
                                     DEVICE, mode="parity") is None}
    order = sorted(wanted, key=lambda i: (i not in TRITON_IMPLS, PARITY_IMPLS.index(i)))
    workers = 1 if ON_GPU else max(1, min(2, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers)
    futures: dict = {}

    def get(impl):
        if not futures:
            futures.update({i: pool.submit(_run_parity, i, root) for i in order})
        if impl not in futures:
            futures[impl] = pool.submit(_run_parity, impl, root)
        return futures[impl].result()
    yield get
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parity
@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("impl", PARITY_IMPLS)
def test_parity(impl, case_id, parity_results):
    case = CASES[case_id]
    reason = unavailable_reason(impl, case, DEVICE, mode="parity")
    if reason:
        pytest.skip(reason)
    results = parity_results(impl)
    if isinstance(results, Exception):
        pytest.fail(f"{impl}: the parity run failed: {results}")
    r = results[case_id]
    bad = check_errors(r["errors"], case.dtype)
    errs = ", ".join(f"{k} {float(v):.2g}" for k, v in r["errors"].items())
    assert not bad, f"{impl} ({IMPLS[impl].piece}) on {case_id}: " + "; ".join(bad) + f" [{errs}]"
