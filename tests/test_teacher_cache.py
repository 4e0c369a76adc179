"""The cache of teacher outputs: `python -m prada_fast.precompute_teacher` and the trainer's
--teacher-outputs. Its rows against the teacher run independently (a Hugging Face forward
per example), training from a hidden-state cache against the live teacher (the same losses
and final weights), the refusals of a cache that does not match the run, a crash while
caching, and two ranks against one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from runner import REPO, train_env

from prada_fast.common.files import write_json_atomic
from prada_fast.teacher import cache as tc
from prada_fast.common.distributed import free_port, launch_cmd

TAU = 1.7
# small training data without held-out records; a metrics line every step
DATA = ["--data", "synthetic:12", "--eval-per-domain", "0", "--max-len", "96", "--seed", "3",
        "--no-progress"]
TRAIN = ["--max-steps", "3", "--save-every", "0", "--log-every", "1", "--max-new-tokens", "4"]


def dist_env(cache_root) -> dict:
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "PRADA_FAST_CACHE": str(cache_root),
            "OMP_NUM_THREADS": "1"}


def in_process(fn, argv, cache_root):
    """fn(argv) in this process as a world of one (a fresh port each call)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dist_env(cache_root).items():
            mp.setenv(k, v)
        return fn(argv)


def precompute(argv, cache_root):
    from prada_fast.precompute_teacher import main
    return in_process(main, argv, cache_root)


def train(argv, cache_root):
    from prada_fast.train import main
    return in_process(main, argv, cache_root)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher-cache")


def save_teacher(path, seed):
    """The tiny-teacher preset with random weights (seeded) as a model directory."""
    from prada_fast.models import load_causal_lm
    model, tok = load_causal_lm("tiny-teacher", seed=seed, attn="eager")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(root):
    return save_teacher(root / "teacher", seed=11)


@pytest.fixture(scope="module")
def hidden_cache(root, teacher):
    out = root / "hidden"
    assert precompute(["--out", str(out), "--teacher", str(teacher), *DATA, "--batch-size", "5"],
                      root) == 0
    return out


@pytest.fixture(scope="module")
def topk_cache(root, teacher):
    out = root / "topk"
    assert precompute(["--out", str(out), "--teacher", str(teacher), *DATA, "--mode", "topk",
                       "--k", "7", "--temperature", str(TAU)], root) == 0
    return out


def training_examples(argv):
    """The encoded training examples of a precompute command line, rebuilt from its flags."""
    from prada_fast.data.prepare import encode_all, load_run_data
    from prada_fast.precompute_teacher import load_tokenizer, parse_args
    from prada_fast.trainer.settings import data_settings
    args = parse_args(["--out", "unused", *argv])
    data = load_run_data(data_settings(args))
    tok = load_tokenizer(args.student)
    domain_ids = {d: i for i, d in enumerate(data.domains)}
    examples, _ = encode_all(data.train_records, tok, args.max_len, domain_ids)
    return examples


def reference_outputs(teacher_dir, examples):
    """{key: (final hidden states, logits) at the labelled positions}, one example at a time."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    out = {}
    with torch.no_grad():
        for ex in examples:
            pos = tc.labelled_positions(ex["labels"])
            if not pos:
                continue
            o = model(input_ids=torch.tensor([ex["input_ids"]]), output_hidden_states=True)
            out[tc.example_key(ex["input_ids"], ex["labels"])] = (o.hidden_states[-1][0, pos],
                                                                   o.logits[0, pos])
    return out, model.lm_head.weight.detach()


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- the rows
def test_hidden_rows_and_head_equal_the_teacher(hidden_cache, teacher):
    examples = training_examples(["--teacher", str(teacher), *DATA])
    ref, head = reference_outputs(teacher, examples)
    reader = tc.TeacherOutputs(hidden_cache)
    assert reader.manifest["records"]["count"] == len(ref) > 10
    assert sorted(reader.rows) == sorted(ref)  # every labelled example, nothing else
    assert torch.equal(reader.head, head)
    for key, (h, _) in ref.items():
        got = torch.from_numpy(np.array(reader.entry(key, "hidden.bin")))
        assert got.shape == h.shape and rel(got, h) < 1e-5, key


def test_topk_rows_are_the_top_log_probabilities_at_tau(topk_cache, teacher):
    examples = training_examples(["--teacher", str(teacher), *DATA])
    ref, _ = reference_outputs(teacher, examples)
    reader = tc.TeacherOutputs(topk_cache)
    m = reader.manifest
    assert (m["mode"], m["k"], m["temperature"]) == ("topk", 7, TAU)
    assert sorted(reader.rows) == sorted(ref)
    for key, (_, logits) in ref.items():
        logp = torch.log_softmax(logits.double() / TAU, -1)
        top = torch.topk(logp, 7, dim=-1)
        ids = torch.from_numpy(np.array(reader.entry(key, "ids.bin"))).long()
        lp = torch.from_numpy(np.array(reader.entry(key, "logprobs.bin")))
        assert torch.allclose(lp.double(), top.values, atol=2e-5, rtol=0), key
        # the ids: those of torch.topk, up to ties (checked through their log-probabilities)
        assert torch.allclose(logp.gather(-1, ids), top.values, atol=2e-5, rtol=0), key
        assert (ids == top.indices).float().mean() > 0.99


def test_reader_places_each_examples_rows_at_its_labelled_positions(tmp_path):
    """A cache written through PartWriter with random rows (two parts, bf16): op_inputs
    puts row j of an example at its j-th labelled position and zeros elsewhere, in plain
    and in packed rows."""
    H, V = 6, 11
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    exs = []
    for i in range(5):
        n = 4 + i
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        labels = [-100] * 2 + ids[2:] if i != 3 else [-100] * n  # example 3: unlabelled
        exs.append((ids, labels))
    rows = {tc.example_key(i, lab): torch.randn(len(tc.labelled_positions(lab)), H, generator=g)
            for i, lab in exs if tc.labelled_positions(lab)}
    arrays = tc.row_arrays("hidden", H, 0, "bfloat16")
    keys = list(rows)
    for part, ks in (("a", keys[:2]), ("b", keys[2:])):
        w = tc.PartWriter(tmp_path / tc.PARTS / part, arrays)
        for k in ks:
            w.write_rows({"hidden.bin": rows[k].to(torch.bfloat16).view(torch.uint16).numpy()})
            w.commit([k], [rows[k].shape[0]])
        w.close()
    done = tc.committed(tmp_path / tc.PARTS)
    parts = tc.write_index(tmp_path, keys, done)
    np.save(tmp_path / tc.HEAD, torch.randn(V, H).to(torch.bfloat16).view(torch.uint16).numpy())
    part_rows = [sum(sum(b["rows"]) for b in tc.read_progress(tmp_path / tc.PARTS / p)) for p in parts]
    write_json_atomic(tmp_path / tc.MANIFEST, {
        "format": tc.FORMAT, "mode": "hidden", "dtype": "bfloat16", "hidden_size": H,
        "vocab_size": V, "parts": parts, "part_rows": part_rows})
    from prada_fast.data import Collator
    mb = Collator(0)([{"input_ids": i, "labels": lab, "domain": 0} for i, lab in exs])
    reader = tc.TeacherOutputs(tmp_path)
    got = reader.op_inputs(mb, "cpu")["teacher_hidden"]
    want = torch.zeros_like(got)
    for b, (ids, lab) in enumerate(exs):
        for j, t in enumerate(tc.labelled_positions(lab)):
            want[b, t] = rows[tc.example_key(ids, lab)][j].to(torch.bfloat16).float()
    assert torch.equal(got, want)
    # packed rows: examples 0, 1 and 2 in one row, 3 and 4 in another, seq_index numbering them
    packed = {"input_ids": torch.zeros(2, 40, dtype=torch.long),
              "labels": torch.full((2, 40), -100), "seq_index": torch.full((2, 40), -1)}
    want = torch.zeros(2, 40, H)
    at = {0: 0, 1: 0}
    for s_, (ids, lab) in enumerate(exs):
        r = 0 if s_ < 3 else 1
        a, n = at[r], len(ids)
        packed["input_ids"][r, a:a + n] = torch.tensor(ids)
        packed["labels"][r, a:a + n] = torch.tensor(lab)
        packed["seq_index"][r, a:a + n] = s_
        for j, t in enumerate(tc.labelled_positions(lab)):
            want[r, a + t] = rows[tc.example_key(ids, lab)][j].to(torch.bfloat16).float()
        at[r] = a + n
    packed["attention_mask"] = (packed["seq_index"] >= 0).long()
    assert torch.equal(reader.op_inputs(packed, "cpu")["teacher_hidden"], want)


def test_a_crash_leaves_no_committed_half_batch(tmp_path):
    """Rows written but not committed (a crash) are dropped when the part is reopened."""
    arrays = tc.row_arrays("topk", 0, 3, "float32")
    w = tc.PartWriter(tmp_path, arrays)
    a = {"ids.bin": np.arange(6, dtype=np.int32).reshape(2, 3),
         "logprobs.bin": -np.random.rand(2, 3).astype(np.float32)}
    w.write_rows(a)
    w.commit(["k1"], [2])
    w.write_rows({n: v[:1] for n, v in a.items()})  # crash: rows on disk, no commit
    w.progress.write('{"keys": ["k2"], "ro')  # and a progress line cut short
    w.close()
    w = tc.PartWriter(tmp_path, arrays)
    assert w.rows == 2 and (tmp_path / "ids.bin").stat().st_size == 2 * 3 * 4
    w.close()
    assert tc.committed(tmp_path.parent)[  # committed() reads parts under a folder
        "k1"] == (tmp_path.name, 0, 2)


# ----------------------------------------------------------------------------- training
def test_training_from_a_hidden_cache_equals_the_live_teacher(root, teacher, hidden_cache):
    runs = {}
    for name, extra in (("live", []), ("cached", ["--teacher-outputs", str(hidden_cache)])):
        out = root / f"run-{name}"
        assert train([*DATA, *TRAIN, "--teacher", str(teacher), "--output-dir", str(out), *extra],
                     root) == 0
        runs[name] = out
    live, cached = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
                    for r in runs.values())
    assert len(live) == len(cached) == 3
    for a, b in zip(live, cached):
        assert a["kd"] > 0.01  # the KD term is there
        for key in ("loss", "ce", "kd", "dom"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (a["step"], key)
    from safetensors.torch import load_file
    wa, wb = (load_file(r / "final" / "model.safetensors") for r in runs.values())
    assert wa.keys() == wb.keys()
    for k in wa:
        assert rel(wb[k], wa[k]) < 1e-6, k


@pytest.fixture
def stderr_lines(capfd):
    def lines():
        return [x for x in capfd.readouterr().err.splitlines() if x.strip()]
    return lines


@pytest.mark.parametrize("case", ["max_len", "tokenizer", "teacher", "data", "records",
                                  "temperature", "unfinished"])
def test_a_cache_that_does_not_match_the_run_is_refused(case, root, teacher, hidden_cache,
                                                       topk_cache, tmp_path, stderr_lines):
    import shutil
    cache, argv, field = hidden_cache, [*DATA, "--teacher", str(teacher)], f'"{case}"'
    if case == "max_len":
        argv += ["--max-len", "80"]
    elif case == "tokenizer":  # the same cache, as if made with another tokenizer
        cache = tmp_path / "cache"
        shutil.copytree(hidden_cache, cache)
        m = tc.read_json(cache / tc.MANIFEST)
        m["tokenizer"]["sha256"] = "0" * 16
        write_json_atomic(cache / tc.MANIFEST, m)
    elif case == "teacher":
        argv[-1] = str(save_teacher(tmp_path / "other-teacher", seed=12))
    elif case == "data":  # records the cache has never seen
        (tmp_path / "other.jsonl").write_text("".join(json.dumps(
            {"question": f"What is {i} + 1?", "rationale": f"{i} + 1 = {i + 1}.", "answer": str(i + 1),
             "domain": "plus"}) + "\n" for i in range(12)))
        argv[argv.index("synthetic:12")] = f"jsonl:{tmp_path / 'other.jsonl'}"
    elif case == "records":  # more records than were cached: some are missing
        argv[argv.index("synthetic:12")] = "synthetic:24"
    elif case == "temperature":
        cache = topk_cache
        argv += ["--temperature", "1.0"]
    elif case == "unfinished":
        cache = tmp_path / "cache"
        shutil.copytree(hidden_cache, cache)
        (cache / tc.MANIFEST).unlink()
        field = "not a finished teacher cache"
    stderr_lines()
    out = tmp_path / "run"
    code = train([*argv, *TRAIN, "--output-dir", str(out), "--teacher-outputs", str(cache)], root)
    err = [x for x in stderr_lines() if "error" in x.lower()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: --teacher-outputs") and field in err[0], err
    assert not out.exists()


def test_training_from_a_topk_cache_with_k_equal_v_equals_the_live_teacher(root, teacher, tmp_path):
    """At K = V the top-k KD is the full KD: the losses of the live teacher."""
    cache = tmp_path / "topk-all"
    from prada_fast.models import byte_tokenizer
    vocab = len(byte_tokenizer())  # the teacher's vocabulary, every id
    assert precompute(["--out", str(cache), "--teacher", str(teacher), *DATA, "--mode", "topk",
                       "--k", str(vocab), "--temperature", str(TAU)], root) == 0
    rows = {}
    for name, extra in (("live", []), ("topk", ["--teacher-outputs", str(cache)])):
        out = tmp_path / f"run-{name}"
        assert train([*DATA, *TRAIN, "--teacher", str(teacher), "--temperature", str(TAU),
                      "--output-dir", str(out), *extra], root) == 0
        rows[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["live"], rows["topk"]):
        for key in ("loss", "ce", "kd", "dom"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)


# ----------------------------------------------------------------------------- processes
def run_precompute(argv, root, nproc=1, check=True):
    cmd = [*launch_cmd(REPO / "prada_fast" / "precompute_teacher.py", nproc), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(root), capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def same_rows(a, b, name, tol):
    ra, rb = tc.TeacherOutputs(a), tc.TeacherOutputs(b)
    assert sorted(ra.rows) == sorted(rb.rows)
    for key in ra.rows:
        x = torch.from_numpy(np.array(ra.entry(key, name))).double()
        y = torch.from_numpy(np.array(rb.entry(key, name))).double()
        assert x.shape == y.shape and torch.allclose(x, y, rtol=tol, atol=tol), key


@pytest.mark.slow
def test_a_crash_while_caching_leaves_no_finished_cache_then_resumes(root, teacher, hidden_cache,
                                                                     tmp_path):
    """One rank crashes with half a batch on disk; two ranks resume and finish."""
    out = tmp_path / "cache"
    argv = ["--out", str(out), "--teacher", str(teacher), *DATA, "--batch-size", "5"]
    proc = run_precompute([*argv, "--crash-after", "2"], root, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not (out / tc.MANIFEST).exists() and not (out / tc.INDEX).exists()
    with pytest.raises(tc.TeacherCacheError, match="not a finished teacher cache"):
        tc.open_manifest(out)
    done = tc.committed(out / tc.PARTS)
    assert len(done) == 10  # two batches of 5 committed; the third's rows are cut off
    proc = run_precompute(argv, root, nproc=2)  # resumed by two ranks, in parts of their own
    assert "10 cached already" in proc.stdout
    m = tc.read_json(out / tc.MANIFEST)
    assert m["parts"] == ["w1-r0", "w2-r0", "w2-r1"]
    rows = sum(n for _, _, n in done.values())
    assert (out / tc.PARTS / "w1-r0" / "hidden.bin").stat().st_size == rows * m["hidden_size"] * 4
    same_rows(out, hidden_cache, "hidden.bin", 1e-5)
    assert tc.read_json(out / tc.MANIFEST)["records"] == tc.read_json(hidden_cache / tc.MANIFEST)["records"]


@pytest.mark.slow
def test_two_ranks_cache_what_one_rank_caches(root, teacher, topk_cache, tmp_path):
    if sys.platform != "linux" or not os.access("/dev/shm", os.W_OK):
        pytest.skip("the deepspeed launcher on the CPU needs /dev/shm")
    out = tmp_path / "cache"
    run_precompute(["--out", str(out), "--teacher", str(teacher), *DATA, "--mode", "topk",
                    "--k", "7", "--temperature", str(TAU), "--batch-size", "3"], root, nproc=2)
    m = tc.read_json(out / tc.MANIFEST)
    assert m["world_size"] == 2 and sorted(m["parts"]) == ["w2-r0", "w2-r1"]
    same_rows(out, topk_cache, "logprobs.bin", 1e-5)
    same_rows(out, topk_cache, "ids.bin", 0)


# ----------------------------------------------------------------------------- the command's flags
@pytest.mark.parametrize("extra", [["--k", "0", "--mode", "topk"], ["--batch-size", "0"],
                                   ["--mode", "logits"], ["--out", "FILE"], ["--teacher", "none"],
                                   ["--crash-after", "-1"], ["--max-len", "1"], ["--dtype", "fp8"],
                                   ["--temperature", "0"], ["--teacher", "TMP/no-teacher"]],
                         ids=" ".join)
def test_precompute_refuses_a_bad_flag_in_one_line(extra, tmp_path, capsys):
    from prada_fast.precompute_teacher import main
    (tmp_path / "file").write_text("x\n")
    argv = ["--out", str(tmp_path / "cache"), "--no-progress",
            *[a.replace("FILE", str(tmp_path / "file")).replace("TMP", str(tmp_path)) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and extra[0] in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_precompute_help_lists_its_flags_and_the_trainers(capsys):
    from prada_fast.precompute_teacher import main
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("--out", "--mode", "--k", "--dtype", "--batch-size", "--data", "--source-domains",
                 "--target-domains", "--teacher", "--teacher-steps", "--max-len", "--seed",
                 "--temperature", "--student", "--ds"):
        assert f"{name} " in text or f"{name}\n" in text, name


def test_precompute_will_not_mix_other_inputs_into_a_cache(root, teacher, topk_cache, capfd):
    capfd.readouterr()
    code = precompute(["--out", str(topk_cache), "--teacher", str(teacher), *DATA], root)  # hidden
    err = [x for x in capfd.readouterr().err.splitlines() if "error" in x.lower()]
    assert code == 2 and len(err) == 1 and 'field "mode"' in err[0], err
    assert tc.read_json(topk_cache / tc.MANIFEST)["mode"] == "topk"


def test_teacher_identity_follows_what_makes_the_teacher(tmp_path, teacher):
    """An auto teacher is named by its fit (steps, lr, seed, examples), a directory by its
    files (not its path), a preset by its name and init seed."""
    import shutil
    from dataclasses import replace

    from prada_fast.teacher.resolve import TeacherSpec
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "n_labels": 2}]
    auto = TeacherSpec(name="auto", steps=10, lr=3e-3, seed=0)
    ident = tc.teacher_provenance(auto, exs)
    assert ident["kind"] == "auto-fit" and ident == tc.teacher_provenance(replace(auto), exs)
    for change in ({"steps": 11}, {"lr": 1e-3}, {"seed": 1}):
        assert tc.teacher_provenance(replace(auto, **change), exs) != ident, change
    assert tc.teacher_provenance(auto, [{**exs[0], "labels": [-100, -100, 7]}]) != ident
    moved = shutil.copytree(teacher, tmp_path / "moved")
    d = tc.teacher_provenance(TeacherSpec(name=str(teacher), seed=0), exs)
    assert d == tc.teacher_provenance(TeacherSpec(name=str(moved), seed=5), exs)
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("192", "193"))
    assert tc.teacher_provenance(TeacherSpec(name=str(moved), seed=0), exs) != d
    assert tc.teacher_provenance(TeacherSpec(name="tiny-teacher", seed=0), exs) != \
        tc.teacher_provenance(TeacherSpec(name="tiny-teacher", seed=1), exs)
