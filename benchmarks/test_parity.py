"""Parity of every implementation (ours and the peers) against the float64 oracle on small,
odd cases, with docs/design.md's tolerances. One subprocess per implementation runs all its
cases (the Triton ones under TRITON_INTERPRET=1 on a CPU). Fast: this is the CI subset,
`pytest benchmarks -m parity --benchmark-disable`."""
from __future__ import annotations

import json

import pytest

from benchmarks.cases import IMPLS, TRITON_IMPLS, check_errors, unavailable_reason
from benchmarks.harness import DEVICE, ON_GPU, PARITY_CASES, PARITY_IMPLS, CaseFailed, run_module

CASES = {c.id: c for c in PARITY_CASES}


@pytest.fixture(scope="session")
def parity_results(tmp_path_factory):
    """parity_results(impl) -> {case id: result}: one subprocess per implementation."""
    root = tmp_path_factory.mktemp("parity")
    cache: dict = {}

    def get(impl):
        if impl not in cache:
            cases = [c for c in PARITY_CASES if unavailable_reason(impl, c, DEVICE, mode="parity") is None]
            path = root / f"{impl}.json"
            path.write_text(json.dumps([c.to_dict() for c in cases]))
            try:
                res = run_module("benchmarks.run_case",
                                 ["parity", "--impl", impl, "--cases", str(path), "--device", DEVICE],
                                 interpret_triton=impl in TRITON_IMPLS and not ON_GPU, timeout=900)
                cache[impl] = {r["case_id"]: r for r in res["results"]}
            except CaseFailed as e:
                cache[impl] = e
        return cache[impl]
    return get


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
