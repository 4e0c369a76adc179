"""Every flag of prada_fast/train.py is checked before any work: for each flag of the parser
a bad value exits 2 with one line naming the flag, and writes nothing. A flag without a row
in BAD (or an entry in NO_BAD_VALUE) fails test_every_flag_has_a_row. In-process calls of
`prada_fast.train.main`, with the run itself replaced by a failure: a flag that is only
checked once the run has started fails here."""
import pytest

from prada_fast import train
from prada_fast.trainer.flags import build_parser, parse_args, teacher_fit_note

# flag -> the arguments that make it bad (TMP: this test's tmp_path; FILE: a file there).
# A combination names the flag of its row, possibly with another one.
BAD = {
    "--ds": ["--ds", "TMP/missing.json"],
    "--report-to": ["--report-to", "wandb"],
    "--output-dir": ["--output-dir", "FILE"],
    "--resume": ["--resume", "--overwrite"],
    "--overwrite": ["--overwrite", "--resume"],
    "--max-steps": ["--max-steps", "0"],
    "--stop-after": ["--stop-after", "-1"],
    "--save-every": ["--save-every", "-1"],
    "--keep-checkpoints": ["--keep-checkpoints", "-1"],
    "--log-every": ["--log-every", "0"],
    "--probe-every": ["--probe-every", "-1"],
    "--seed": ["--seed", "-1"],
    "--dist-timeout": ["--dist-timeout", "0"],
    "--max-bad-steps": ["--max-bad-steps", "0"],
    "--inject-nan": ["--inject-nan", "0,x"],
    "--local_rank": ["--local_rank", "-2"],
    "--data": ["--data", "nosuchformat:TMP/x.jsonl"],
    "--source-domains": ["--source-domains", "arithmetic,,coinflip"],
    "--target-domains": ["--source-domains", "arithmetic", "--target-domains", "arithmetic"],
    "--max-len": ["--max-len", "1"],
    "--on-long": ["--on-long", "cut"],
    "--tokens-per-batch": ["--tokens-per-batch", "-1"],
    "--eval-per-domain": ["--eval-per-domain", "-1"],
    "--student": ["--student", "TMP/no-model"],
    "--teacher": ["--teacher", "TMP/no-teacher"],
    "--teacher-steps": ["--teacher-steps", "0"],
    "--teacher-seed": ["--teacher-seed", "-1"],
    "--data-seed": ["--data-seed", "-1"],
    "--teacher-lr": ["--teacher-lr", "0"],
    "--teacher-fit-cache": ["--teacher-fit-cache", "FILE"],
    "--teacher-cache": ["--teacher-cache", "FILE"],  # the deprecated name of --teacher-fit-cache
    "--teacher-outputs": ["--teacher-outputs", "TMP/no-cache"],
    "--prompt-len": ["--prompt-len", "-1"],
    "--prompt-encoder": ["--prompt-encoder", "mlp", "--prompt-len", "0"],
    "--prompt-hidden": ["--prompt-hidden", "16"],  # without --prompt-encoder
    "--prompt-init": ["--prompt-init", "words"],
    "--domain-head": ["--domain-head", "conv"],
    "--mlp-hidden": ["--mlp-hidden", "16"],  # without --domain-head mlp
    "--pool": ["--pool", "everything"],
    "--pool-layer": ["--pool-layer", "-1"],
    "--attn": ["--attn", "flash"],
    "--loss-impl": ["--loss-impl", "fast"],
    "--alpha": ["--alpha", "1.5"],
    "--temperature": ["--temperature", "0"],
    "--adversary": ["--adversary", "dann"],
    "--domain-head-lr-mult": ["--domain-head-lr-mult", "0"],
    "--lm-weight": ["--lm-weight", "-0.5"],
    "--domain-steps": ["--domain-steps", "-1"],
    "--one-rank-zero": ["--one-rank-zero", "always"],
    "--teacher-memo-mb": ["--teacher-memo-mb", "-1"],
    "--lambda-schedule": ["--lambda-schedule", "linear"],
    "--grl-schedule": ["--grl-schedule", "linear"],  # the deprecated name of --lambda-schedule
    "--lambda-max": ["--lambda-max", "nan"],
    "--lambda-gamma": ["--lambda-gamma", "-1"],
    "--grl-gamma": ["--grl-gamma", "-1"],  # the deprecated name of --lambda-gamma
    "--lr": ["--lr", "0"],
    "--max-new-tokens": ["--max-new-tokens", "0"],
    "--eval-batch-size": ["--eval-batch-size", "0"],
}
NO_BAD_VALUE = {  # flag -> why no value of it is wrong on its own
    "--help": "prints the help",
    "--no-progress": "a switch with no combination to contradict",
    "--skip-bad": "a switch with no combination to contradict",
    "--layer-probes": "a switch; without held-out records it measures nothing, as the probe",
    "--packing": "a switch (--no-packing: off) with no combination to contradict",
    "--no-domain-loss": "a switch; the flags it makes moot are still valid",
}
# more bad values where a flag has several ways to be wrong
MORE_BAD = [
    ["--alpha", "-0.1"], ["--alpha", "x"], ["--temperature", "inf"], ["--max-steps", "1.5"],
    ["--alpha", "0", "--teacher", "none"], ["--data", "synthetic:0"], ["--data", "synthetic:4:geometry"],
    ["--data", "TMP/gsm8k_missing.jsonl"], ["--data", "jsonl:TMP/x.jsonl?color=red"],
    ["--seed", str(2**32)], ["--max-len", "0"], ["--prompt-encoder", "gru"],
    ["--prompt-hidden", "-1", "--prompt-encoder", "lstm"],
    ["--probe-every", "50", "--eval-per-domain", "1"],
    ["--domain-steps", "2", "--adversary", "mmd"], ["--domain-steps", "1", "--no-domain-loss"],
    ["--teacher-outputs", "TMP"],  # a folder without a manifest: no finished cache
    ["--teacher-outputs", "TMP", "--teacher", "none"],
]


def test_the_old_name_of_teacher_fit_cache_warns(tmp_path, capsys):
    args = parse_args(["--output-dir", str(tmp_path / "run"), "--teacher-cache", str(tmp_path / "fits")])
    assert args.teacher_fit_cache == str(tmp_path / "fits")
    assert capsys.readouterr().err.strip() == ("warning: --teacher-cache is deprecated, use "
                                               "--teacher-fit-cache")
    args = parse_args(["--output-dir", str(tmp_path / "run"), "--teacher-fit-cache", str(tmp_path / "f")])
    assert args.teacher_fit_cache == str(tmp_path / "f") and not capsys.readouterr().err


def test_teacher_fit_flags_without_a_fit_are_named(tmp_path):
    """--teacher-steps/--teacher-lr fit the auto teacher only: with a real teacher (or none,
    or a cache) the run says that they are not used, instead of ignoring them silently."""
    out = ["--output-dir", str(tmp_path / "run")]
    assert teacher_fit_note(parse_args([*out, "--teacher-steps", "50"])) is None  # the auto fit
    assert teacher_fit_note(parse_args([*out, "--teacher", "none"])) is None  # nothing given
    note = teacher_fit_note(parse_args([*out, "--student", "smollm2-135m-l8", "--teacher",
                                        "smollm2-135m", "--teacher-steps", "50"]))
    assert note.startswith("note: --teacher-steps set the fit") and "(--teacher smollm2-135m)" in note
    assert "--student TEACHER --teacher none --no-domain-loss --prompt-len 0" in note
    note = teacher_fit_note(parse_args([*out, "--teacher", "none", "--teacher-lr", "1e-4",
                                        "--teacher-steps", "9"]))
    assert "--teacher-steps and --teacher-lr set the fit" in note


def _long(action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def test_every_flag_has_a_row():
    flags = {_long(a) for a in build_parser()._actions}
    missing = sorted(flags - BAD.keys() - NO_BAD_VALUE.keys())
    assert not missing, f"give these flags a bad value in tests/test_cli.py BAD: {missing}"
    stale = sorted((BAD.keys() | NO_BAD_VALUE.keys()) - flags)
    assert not stale, f"rows for flags the parser no longer has: {stale}"


@pytest.fixture
def call(tmp_path, monkeypatch, capsys):
    """main(argv) in this process with the run replaced by a failure: (exit code, stderr lines)."""
    def no_run(args):
        raise AssertionError("the run started: the bad flag was not caught by parse_args")
    monkeypatch.setattr(train, "run", no_run)
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    (tmp_path / "file").write_text("not a directory\n")

    def call(extra):
        argv = ["--output-dir", str(tmp_path / "run"), "--no-progress",
                *[a.replace("FILE", str(tmp_path / "file")).replace("TMP", str(tmp_path)) for a in extra]]
        code = train.main(argv)
        return code, capsys.readouterr().err.strip().splitlines()
    return call


def _assert_refused(call, tmp_path, extra, name):
    code, err = call(extra)
    assert code == 2, (extra, code, err)
    assert len(err) == 1 and err[0].startswith("error: "), (extra, err)
    assert name in err[0], (extra, err[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "x.jsonl"]  # nothing written
    assert (tmp_path / "file").read_text() == "not a directory\n"


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_value_exits_2_with_one_line_naming_the_flag(name, call, tmp_path):
    _assert_refused(call, tmp_path, BAD[name], name)


@pytest.mark.parametrize("extra", MORE_BAD, ids=" ".join)
def test_more_bad_values(extra, call, tmp_path):
    _assert_refused(call, tmp_path, extra, extra[0])


def test_defaults_and_edge_values_pass(tmp_path):
    out = ["--output-dir", str(tmp_path / "run")]
    args = parse_args(out)
    assert args.on_long is None and args.keep_checkpoints == 0 and args.data == ["synthetic"]
    parse_args([*out, "--alpha", "0", "--alpha", "1", "--temperature", "0.01", "--seed", str(2**32 - 1),
                "--max-len", "2", "--stop-after", "0", "--save-every", "0", "--lambda-max", "0",
                "--eval-per-domain", "0", "--prompt-len", "0", "--domain-head", "mlp",
                "--mlp-hidden", "16", "--inject-nan", "3,4", "--on-long", "truncate",
                "--source-domains", "arithmetic", "--target-domains", "sorting",
                "--packing", "--tokens-per-batch", "1"])
    assert args.packing and args.tokens_per_batch == 0
    assert not parse_args([*out, "--no-packing"]).packing
    parse_args([*out, "--alpha", "0"])  # the auto teacher of the preset student: KD is possible


# ----------------------------------------------------------------------------- every command's flags
def _parsers():
    """Each command's parser, built as the command builds it."""
    from prada_fast import evaluate
    from prada_fast.experiments.compare import flags as compare_flags
    from prada_fast.precompute_teacher import build_precompute_parser
    from prada_fast.teacher.rationales import build_parser as rationales_parser
    return {"train": build_parser(), "precompute_teacher": build_precompute_parser(),
            "rationales": rationales_parser(), "compare": compare_flags.build_parser(),
            "evaluate": evaluate.build_parser()}


def test_shared_flags_are_the_same_flag_in_every_command():
    """A shared flag has one name and one dest in every command, its default unless the
    command documents another (its own help), and its range wherever it is."""
    from prada_fast.common.flags import SHARED_FLAGS, DeprecatedAlias, FlagParser, add_flags, shared
    where = {dest: [] for dest in SHARED_FLAGS}
    reference = FlagParser()
    add_flags(reference, None, SHARED_FLAGS)
    default = {a.dest: a.default for a in reference._actions}
    for command, parser in _parsers().items():
        for a in parser._actions:
            if a.dest not in where or isinstance(a, DeprecatedAlias):
                continue
            spec = shared(a.dest)
            where[a.dest].append(command)
            assert tuple(a.option_strings) == spec.names, (command, a.dest)
            if a.dest in parser.own_defaults:
                assert a.default != default[a.dest] and a.help != spec.kwargs["help"], (command, a.dest)
            else:
                assert a.default == default[a.dest], (command, a.dest)
            if spec.range is not None:
                assert a.dest in parser.ranges, (command, a.dest)
    assert all(len(commands) >= 2 for commands in where.values()), where


@pytest.mark.parametrize("command,argv,old,new,value", [
    ("rationales", ["--teacher", "tiny-teacher", "--data", "synthetic:2:coinflip", "--out", "TMP/o.jsonl"],
     "--temperature", "sample_temperature", 0.3),
    ("compare", ["--output-dir", "TMP/cmp"], "--head-lr-mult", "domain_head_lr_mult", 3.0),
    ("train", ["--output-dir", "TMP/run"], "--grl-gamma", "lambda_gamma", 4.5),
    ("train", ["--output-dir", "TMP/run"], "--grl-schedule", "lambda_schedule", "constant"),
])
def test_a_deprecated_name_warns_and_sets_the_new_flag(command, argv, old, new, value, tmp_path, capsys,
                                                      monkeypatch):
    from prada_fast.common.flags import flag
    from prada_fast.experiments.compare import flags as compare_flags
    from prada_fast.teacher import rationales
    monkeypatch.delenv("RANK", raising=False)
    parse = {"rationales": rationales.parse_args, "compare": compare_flags.parse_args,
             "train": parse_args}[command]
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    args = parse([*argv, old, str(value)])
    assert getattr(args, new) == value
    name = flag(_parsers()[command], new)
    assert capsys.readouterr().err.strip() == f"warning: {old} is deprecated, use {name}"
    assert getattr(parse([*argv, name, str(value)]), new) == value and not capsys.readouterr().err


@pytest.mark.parametrize("command,argv", [
    ("train", ["--output-dir", "TMP/run", "--seed", "-1"]),
    ("precompute_teacher", ["--out", "TMP/cache", "--seed", "-1"]),
    ("rationales", ["--teacher", "tiny-teacher", "--data", "synthetic:2:coinflip", "--out", "TMP/o.jsonl",
                    "--seed", "-1"]),
    ("compare", ["--output-dir", "TMP/cmp", "--max-steps", "0"]),
    ("evaluate", ["--model", "tiny", "--data", "synthetic:2", "--out", "TMP/e.json",
                  "--max-new-tokens", "0"]),
])
def test_one_range_check_refuses_a_bad_value_in_every_command(command, argv, tmp_path, capsys, monkeypatch):
    import importlib
    module = {"train": "prada_fast.train", "precompute_teacher": "prada_fast.precompute_teacher",
              "rationales": "prada_fast.rationales", "compare": "prada_fast.experiments.compare",
              "evaluate": "prada_fast.evaluate"}[command]
    monkeypatch.delenv("RANK", raising=False)
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    code = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith(f"error: {argv[-2]} must be ")
    assert err[0].endswith(f"not {argv[-1]} (see --help)")
    assert list(tmp_path.iterdir()) == []  # nothing written
