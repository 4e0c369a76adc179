"""prada_fast beside TRL's GKDTrainer, small (`python -m benchmarks.peers` at 2 steps of 4
sequences, tiny presets, one thread each, no cache, no micro-batch search, both trainers at
once): both must compute the same loss on the same first batch (relative difference
<= 1e-4, fp32) and reach the same loss at the second step (1e-3: the same update, AdamW on
both); their step times go to pytest-benchmark (measured with the two sharing the cores: a
record, not a comparison). Skipped, with the reason, where TRL is not installed
(`pip install -e ".[peers]"`; the `bench` extra carries it too)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.harness import REPO, record, replay_timer

TOL_FIRST, TOL_LAST = 1e-4, 1e-3


def _have_gkd() -> str | None:
    try:
        import trl
    except ImportError:
        return "TRL is not installed (pip install -e \".[peers]\")"
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError as e:
        return f"trl {trl.__version__} has no trl.experimental.gkd ({e}); benchmarks.peers wants trl >= 1.16"
    return None


@pytest.fixture(scope="module")
def peers_small(tmp_path_factory):
    why = _have_gkd()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("peers") / "peers.md"
    cmd = [sys.executable, "-m", "benchmarks.peers", "--steps", "2", "--batch", "4", "--warmup", "1",
           "--threads", "1", "--k", "0", "--no-max-batch", "--no-op", "--parallel", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.with_suffix(".json").is_file(), f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n" \
                                               f"{proc.stderr[-3000:]}"
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parity
@pytest.mark.benchmark(timer=replay_timer)
@pytest.mark.parametrize("trainer", ["prada-live", "trl-gkd"])
def test_peers_same_loss(trainer, peers_small, benchmark):
    s = peers_small
    check = s["check"]
    assert check is not None
    assert check["rel_diff"] <= TOL_FIRST, (
        f"first-batch loss: prada_fast {check['prada_fast']!r} vs TRL GKD {check['trl_gkd']!r} "
        f"(relative {check['rel_diff']:.2e} > {TOL_FIRST})")
    a, b = s["trainers"]["prada-live"]["losses"], s["trainers"]["trl-gkd"]["losses"]
    assert len(a) == len(b) == 2
    assert abs(a[-1] - b[-1]) <= TOL_LAST * abs(b[-1]), f"loss after 2 steps: {a[-1]} vs {b[-1]}"
    r = s["trainers"][trainer]
    ends = r["step_ends"]  # the steps after the first, each from the previous one's end
    times = [e1 - e0 for e0, e1 in zip(ends, ends[1:])]
    record(benchmark, times, "peers: tiny + tiny-teacher, 2 steps x 4 sequences",
           {"kind": "peers", "trainer": trainer, "tokens_per_s": r["tokens_per_s"],
            "peak_rss_bytes": r["maxrss_bytes"], "first_loss": r["losses"][0], "last_loss": r["losses"][-1],
            "first_loss_rel_diff": check["rel_diff"]})
