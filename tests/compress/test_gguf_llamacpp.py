"""Real llama.cpp (prebuilt, from the npm package node-llama-cpp) runs our GGUF files: it tokenizes like Hugging Face
for every pre-tokenizer we map, and computes what the HF model computes. The same package's libllama quantizes to
Q4_K_M / Q5_K_M / Q6_K (posttrain.compress.llama_quantize), and those files run like the HF model too. Skipped
when node or the package is absent (.ci/run installs it: `npm install --prefix .cache/node-llama-cpp
node-llama-cpp@<pinned>`)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from tiny_models import make_tiny_llama  # tests/ is on sys.path (the rootdir conftest's folder)
from test_gguf import TEXTS, build
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from posttrain.align.engine import TrainOptions, save_pretrained
from posttrain.align.sft import train_sft
from posttrain.compress.gguf_export import FILE_TYPES, LLAMA_CPP_TYPES, export_gguf, find_llama_quantizer
from posttrain.compress.llama_quantize import (LIBRARY_ENV, QuantizeParams, find_libllama, node_llama_cpp_prefix,
                                               quantize_with_libllama)

PREFIX = node_llama_cpp_prefix()  # $POSTTRAIN_NODE_LLAMA_CPP, else the checkout's .cache/node-llama-cpp
SCRIPT = Path(__file__).with_name("llamacpp_check.mjs")
# Texts where pre-tokenizers disagree: runs of spaces before digits, newlines, non-ASCII digits, special and added
# tokens in the text (llama.cpp matches those whole, as HF does).
EDGE = ["a  1  22   333 x", "x\n\n\n  y \t\n", "\u0661\u0662\u00b2\u00bd3 apples", "<|im_start|>user\nhi<|im_end|>\n",
        "<think>ok</think> fine", "I'LL we'VE they're 12,345.67"]
ANSWERS = ["Sam has 3 + 4 = 7 apples.\n#### 7", "Many apples: 11 + 1 = 12.\n#### 12",
           "How many? 5 + 6 = 11.\n#### 11", "Buys 2 more, 9 + 2 = 11 now.\n#### 11"]
# llama.cpp's Q8_0 path moved tiny-model logits by up to 0.072 (shared/COMPRESSION.md §3.3): a top-1 comparison is
# only meaningful where HF's best logit leads the runner-up by more than twice that.
MIN_GAP = 2 * 0.072


def run_llama_cpp(jobs: list[dict], tmp_path: Path) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    if not (PREFIX / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        pytest.skip(f"node-llama-cpp is not installed under {PREFIX} (see .ci/run)")
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run([node, str(SCRIPT), str(PREFIX), str(tmp_path / "jobs.json")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert not [j["error"] for j in out["jobs"] if j["error"]], out["jobs"]
    assert not [line for line in out["log"] if "DEGRADED" in line or "pre-tokenizer" in line], out["log"]
    return out


def sft_model(tokenizer, directory: Path, hidden: int = 64, lr: float = 1e-2) -> Path:
    """A tiny Llama (GQA, tied embeddings) trained a few SFT steps to answer by heart, so its logits are peaky."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    rows = [{"prompt": [{"role": "user", "content": a.split(".")[0]}],
             "completion": [{"role": "assistant", "content": a}]} for a in ANSWERS]
    train_sft(model, tokenizer, rows, TrainOptions(steps=60, batch_size=4, lr=lr, schedule="constant"))
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_tokenizer):
    """Everything llama.cpp has to say, from one node process (its start-up dominates the cost)."""
    root = tmp_path_factory.mktemp("llamacpp")
    jobs, checks = [], {}
    for kind in ("gpt2", "posttrain", "qwen2", "llama3", "mistral-spm"):
        src = build(kind, root / kind)
        path = export_gguf(src, root / f"{kind}.gguf", "f32")
        tok = AutoTokenizer.from_pretrained(src)
        texts = TEXTS + ([t for t in EDGE if "<" not in t] if kind == "mistral-spm" else EDGE)
        ids = tok(" ".join(TEXTS), add_special_tokens=False)["input_ids"][:48]
        checks[kind] = (src, texts, ids, len(jobs))
        jobs.append({"gguf": str(path), "texts": texts, "ids": ids, "top_k": 5})
    # The same posttrain vocabulary under the plain GPT-2 splitting: must differ, or the EDGE texts prove nothing.
    wrong = export_gguf(root / "posttrain", root / "posttrain-gpt2.gguf", "f16", pre_tokenizer="gpt-2")
    checks["posttrain as gpt-2"] = (root / "posttrain", EDGE, None, len(jobs))
    jobs.append({"gguf": str(wrong), "texts": EDGE, "ids": None})
    src = sft_model(tiny_tokenizer, root / "sft")
    conversation = [{"role": "user", "content": ANSWERS[0].split(".")[0]}, {"role": "assistant", "content": ANSWERS[0]}]
    full = tiny_tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt = tiny_tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    full_ids, prompt_ids = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in (full, prompt))
    for qtype in ("F32", "F16", "Q8_0", "Q4_0"):
        path = export_gguf(src, root / f"sft-{qtype}.gguf", qtype)
        checks[qtype] = (path, len(jobs))
        jobs.append({"gguf": str(path), "texts": [full], "ids": full_ids, "top_k": 2})
        jobs.append({"gguf": str(path), "texts": [], "ids": prompt_ids, "n_predict": 12})
    out = run_llama_cpp(jobs, root)
    return {"out": out["jobs"], "checks": checks, "sft": (src, full_ids, prompt_ids)}


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def hf_logits(src, ids) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(src).eval()(torch.tensor([ids])).logits[0].double()


@pytest.mark.parametrize("kind", ["gpt2", "posttrain", "qwen2", "llama3", "mistral-spm"])
def test_llama_cpp_tokenizes_like_hf(results, kind):
    src, texts, _, index = results["checks"][kind]
    tok = AutoTokenizer.from_pretrained(src)
    got = results["out"][index]["tokens"]
    for text, ids in zip(texts, got):
        assert ids == tok(text, add_special_tokens=False)["input_ids"], (kind, text)


def test_posttrain_tokenizer_needs_its_digit_splitting(results):
    """posttrain's tokenizer splits digits before the GPT-2 regex; llama.cpp's "starcoder" does the same (above),
    while "gpt-2" keeps a space run before a digit apart and tokenizes differently."""
    src, texts, _, index = results["checks"]["posttrain as gpt-2"]
    tok = AutoTokenizer.from_pretrained(src)
    got = results["out"][index]["tokens"]
    assert any(ids != tok(t, add_special_tokens=False)["input_ids"] for t, ids in zip(texts, got))


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral-spm"])
def test_llama_cpp_logits_match_hf_on_f32(results, kind):
    """Random weights: compare llama.cpp's top-5 logit gaps (log p_k - log p_top) with HF's. This checks the rotary
    layout (llama permuted, qwen2 not), qwen2's biases and untied outputs in llama.cpp itself."""
    src, _, ids, index = results["checks"][kind]
    logits = hf_logits(src, ids)
    worst = 0.0
    for pos, top in enumerate(results["out"][index]["top"]):
        (best, p_best), rest = top[0], top[1:]
        for token, p in rest:
            hf_gap = float(logits[pos, token] - logits[pos, best])
            worst = max(worst, abs(math.log(p / p_best) - hf_gap))
    # Measured on these models: at most 4.5e-3 with the right layout (llama.cpp keeps its KV cache in F16, so even
    # an F32 file is not bit-exact), at least 1.48 with the rotary layout of the other family.
    assert worst < 0.1, worst


def test_llama_cpp_matches_hf_on_a_trained_model(results):
    src, full_ids, prompt_ids = results["sft"]
    logits = hf_logits(src, full_ids)
    top2 = logits.topk(2).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    assert gap > MIN_GAP, "the SFT model is not peaky enough to compare top-1"
    hf_top1 = logits.argmax(-1).tolist()
    eos = AutoTokenizer.from_pretrained(src).eos_token_id
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.tensor([prompt_ids])
    hf_greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False)[0, len(prompt_ids):].tolist()
    for qtype in ("F32", "F16", "Q8_0"):
        path, index = results["checks"][qtype]
        scored, generated = results["out"][index], results["out"][index + 1]
        assert scored["tokens"] == [full_ids]
        assert [t[0][0] for t in scored["top"]] == hf_top1, qtype
        assert until_eos(generated["greedy"], eos) == until_eos(hf_greedy, eos), qtype


def test_llama_cpp_q4_0_agrees_with_its_dequantized_weights(results):
    """Q4_0 changes the model, so compare with HF running the file's own (dequantized) weights: transformers
    loads them from the GGUF. What remains is llama.cpp's 8-bit activations; COMPRESSION.md §7.3 asks >= 0.9."""
    path, index = results["checks"]["Q4_0"]
    _, full_ids, _ = results["sft"]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        ref = model(torch.tensor([full_ids])).logits[0].argmax(-1).tolist()
    got = [t[0][0] for t in results["out"][index]["top"]]
    assert sum(a == b for a, b in zip(got, ref)) / len(ref) >= 0.9


# K-quants (Q4_K, Q5_K, Q6_K) pack rows in super-blocks of 256 values: at hidden 256 (feed-forward 512) every weight
# row qualifies, so llama.cpp's K-quant types really apply (at hidden 64 it substitutes others throughout, below).
KQUANT_HIDDEN = 256
# At hidden 256, lr 1e-2 leaves the model babbling (greedy "Ho manywSam = 5 711..."); 1e-3 makes it answer ANSWERS[0]
# by heart and stop, so the greedy comparison below is between two runs of a model that knows its answer.
KQUANT_LR = 1e-3


@pytest.fixture(scope="module")
def kquants(tmp_path_factory, tiny_tokenizer):
    """The hidden-256 SFT model as every K-quant type, quantized by the real libllama that node-llama-cpp
    ships (forced through $POSTTRAIN_LIBLLAMA, so an installed llama-cpp-python or llama-quantize is not used
    instead), then scored and run greedily by llama.cpp in one node process."""
    library = require_libllama()
    root = tmp_path_factory.mktemp("kquant")
    src = sft_model(tiny_tokenizer, root / "sft", hidden=KQUANT_HIDDEN, lr=KQUANT_LR)
    conversation = [{"role": "user", "content": ANSWERS[0].split(".")[0]}, {"role": "assistant", "content": ANSWERS[0]}]
    full = tiny_tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt = tiny_tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    full_ids, prompt_ids = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in (full, prompt))
    jobs, files = [], {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LIBRARY_ENV, str(library))
        for qtype in LLAMA_CPP_TYPES:
            files[qtype] = (export_gguf(src, root / f"sft-{qtype}.gguf", qtype), len(jobs))
            jobs.append({"gguf": str(files[qtype][0]), "texts": [full], "ids": full_ids, "top_k": 2})
            jobs.append({"gguf": str(files[qtype][0]), "texts": [], "ids": prompt_ids, "n_predict": 24})
    out = run_llama_cpp(jobs, root)
    return {"out": out["jobs"], "files": files, "src": src, "full_ids": full_ids, "prompt_ids": prompt_ids}


def require_libllama() -> Path:
    library = find_libllama()
    if library is None:
        pytest.skip(f"no libllama: {LIBRARY_ENV} is unset and node-llama-cpp is not installed under {PREFIX}")
    return library


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_params_struct_matches_the_library():
    """QuantizeParams is llama.h's layout: the library's defaults land in the right fields, the last one
    (max_buf_size, at byte 56 of 64) included. Values from llama.h / llama-quant.cpp of the vendored llama.cpp."""
    import ctypes

    lib = ctypes.CDLL(str(require_libllama()))
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    params = lib.llama_model_quantize_default_params()
    assert (QuantizeParams.max_buf_size.offset, QuantizeParams._headroom.offset) == (56, 64)
    assert (params.nthread, params.ftype) == (0, 7)  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert (params.output_tensor_type, params.token_embedding_type) == (43, 43)  # GGML_TYPE_COUNT: "not set"
    assert [params.allow_requantize, params.quantize_output_tensor, params.only_copy, params.pure,
            params.keep_split, params.dry_run] == [False, True, False, False, False, False]
    assert [params.imatrix, params.kv_overrides, params.tt_overrides, params.prune_layers] == [None] * 4
    assert params.max_buf_size == 8 * 1024 ** 3  # LLAMA_QUANT_MAX_BUF_SIZE


def test_node_llama_cpp_libllama_is_found_after_the_others(monkeypatch, tmp_path):
    """Without $POSTTRAIN_LIBLLAMA, llama-cpp-python or llama-quantize, the quantizer is node-llama-cpp's libllama,
    the CPU build for this machine (not libllama-common, not a -cuda / -vulkan build)."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    library = require_libllama()
    kind, found = find_llama_quantizer()
    assert (kind, found) == ("library", library)
    package = found.parents[2]  # <prefix>/node_modules/@node-llama-cpp/linux-<arch>/bins/linux-<arch>/libllama.*
    assert package.parent == PREFIX / "node_modules" / "@node-llama-cpp" and found.parent.name == package.name
    assert package.name.startswith("linux-") and "-" not in package.name.removeprefix("linux-")  # no -cuda etc.
    assert found.name.startswith("libllama.") and found.suffix == ".so"


def test_libllama_failure_names_the_error_and_leaves_no_file(tmp_path):
    bad = tmp_path / "not.gguf"
    bad.write_text("not a GGUF file")
    with pytest.raises(RuntimeError, match="exited 1:(.|\n)*failed to quantize"):
        quantize_with_libllama(require_libllama(), bad, tmp_path / "out.gguf", int(FILE_TYPES["Q4_K_M"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.gguf"]


def test_rows_shorter_than_256_fall_back_to_32_blocks(tmp_path, monkeypatch):
    """At hidden 64 no row fits a K-quant super-block: llama.cpp's tensor_type_fallback turns Q4_K into Q5_0 and
    Q6_K into Q8_0 (both 32-value blocks), so a Q4_K_M file of a tiny model holds no K-quant tensor at all."""
    monkeypatch.setenv(LIBRARY_ENV, str(require_libllama()))
    types = tensor_types(export_gguf(build("gpt2", tmp_path / "gpt2"), tmp_path / "k.gguf", "Q4_K_M"))
    two_d = {n: t for n, t in types.items() if not n.endswith("norm.weight")}
    assert two_d == {"token_embd.weight": "Q5_0", "output.weight": "Q8_0",
                     **{f"blk.{i}.{n}.weight": "Q5_0" for i in (0, 1) for n in
                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")},
                     "blk.1.attn_v.weight": "Q8_0", "blk.1.ffn_down.weight": "Q8_0"}


@pytest.mark.parametrize("qtype, main", [("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K"), ("Q6_K", "Q6_K")])
def test_libllama_writes_k_quant_tensors(kquants, qtype, main):
    """llama.cpp's own mix: the *_K_M types keep the output (here the tied token_embd) and attn_v / ffn_down of
    the "use_more_bits" layers (of 2 layers: the last) at Q6_K; 1-D tensors stay F32."""
    path, _ = kquants["files"][qtype]
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == FILE_TYPES[qtype]
    types = tensor_types(path)
    expected = {f"blk.{i}.{n}.weight": main for i in (0, 1) for n in
                ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    expected.update({"token_embd.weight": "Q6_K", "blk.1.attn_v.weight": "Q6_K", "blk.1.ffn_down.weight": "Q6_K"})
    expected.update({n: "F32" for n in ("output_norm.weight", *(f"blk.{i}.{n}_norm.weight" for i in (0, 1)
                                                                  for n in ("attn", "ffn")))})
    assert types == expected


# Measured on the hidden-256 model (node-llama-cpp 3.21.1): every K-quant agrees with HF's fp32 model on all 33
# top-1 tokens and on the greedy answer. llama.cpp's Q4_K_M moved a top-2 log-probability gap by at most 0.25 from
# HF's (Q6_K 0.13: K-quant matmuls also round activations to 8 bits). HF's top-1 leads by more than 2 * 0.25 at all
# but 3 of the 33 positions (its smallest leads: 0.14, 0.41, 0.50), so: exact agreement where HF leads by more than
# KQUANT_SHIFT, and >= 0.9 (30 of 33) overall.
KQUANT_SHIFT = 2 * 0.25


@pytest.mark.parametrize("qtype", LLAMA_CPP_TYPES)
def test_libllama_k_quants_run_in_llama_cpp_like_hf(kquants, qtype):
    src, full_ids, prompt_ids = kquants["src"], kquants["full_ids"], kquants["prompt_ids"]
    logits = hf_logits(src, full_ids)
    top2 = logits.topk(2).values
    lead = (top2[:, 0] - top2[:, 1]).tolist()
    # The answer's tokens must be clear-cut for the greedy comparison to mean anything (measured min lead: 1.72).
    assert min(lead[len(prompt_ids) - 1:]) > KQUANT_SHIFT
    hf_top1 = logits.argmax(-1).tolist()
    _, index = kquants["files"][qtype]
    scored, generated = kquants["out"][index], kquants["out"][index + 1]
    assert scored["tokens"] == [full_ids]
    got = [t[0][0] for t in scored["top"]]
    assert [g for g, h, d in zip(got, hf_top1, lead) if d > KQUANT_SHIFT] == [
        h for h, d in zip(hf_top1, lead) if d > KQUANT_SHIFT]
    assert sum(g == h for g, h in zip(got, hf_top1)) / len(hf_top1) >= 0.9
    eos = AutoTokenizer.from_pretrained(src).eos_token_id
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.tensor([prompt_ids])
    hf_greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                               do_sample=False)[0, len(prompt_ids):].tolist()
    assert eos in hf_greedy  # the model answers and stops, well within 24 tokens
    assert until_eos(generated["greedy"], eos) == until_eos(hf_greedy, eos)


@pytest.mark.parametrize("qtype", LLAMA_CPP_TYPES)
def test_libllama_k_quants_agree_with_their_dequantized_weights(kquants, qtype):
    """HF running the file's own weights (transformers dequantizes Q4_K / Q5_K / Q6_K on load) against llama.cpp:
    what remains is llama.cpp's 8-bit activations. As for Q4_0, COMPRESSION.md §7.3 asks >= 0.9 (measured: 1.0)."""
    path, index = kquants["files"][qtype]
    full_ids = kquants["full_ids"]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        ref = model(torch.tensor([full_ids])).logits[0].argmax(-1).tolist()
    got = [t[0][0] for t in kquants["out"][index]["top"]]
    assert sum(a == b for a, b in zip(got, ref)) / len(ref) >= 0.9


def test_cli_k_quant_uses_node_llama_cpp_libllama(capsys, monkeypatch, tmp_path, kquants):
    """`posttrain compress --method gguf:q4_k_m` (the pipeline's compressor calls the same compress.api) with only
    node-llama-cpp's libllama present writes a real Q4_K_M file."""
    from test_compress_cli import compress_cli, demonstrations, write_rows

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    calibration = write_rows(tmp_path / "calib.jsonl", demonstrations(24))
    code, _, err = compress_cli(capsys, "--model", str(kquants["src"]), "--method", "gguf:q4_k_m", "--calibration",
                                str(calibration), "--out", str(tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "compression.json").read_text())
    artifact = Path(report["artifact"])
    assert artifact.name == "model-q4_k_m.gguf"
    assert report["details"]["quantizer"]["kind"] == "library"
    assert Path(report["details"]["quantizer"]["path"]).name.startswith("libllama")
    assert gguf.GGUFReader(artifact).fields["general.file_type"].contents() == FILE_TYPES["Q4_K_M"]
    assert tensor_types(artifact)["blk.0.ffn_up.weight"] == "Q4_K"
    # At hidden 256 every row fits the K-quant super-blocks: nothing fell back, and nothing is noted.
    assert report["details"]["tensor_types"] == {"F32": 5, "Q4_K": 12, "Q6_K": 3}
    assert "fallback" not in report["details"] and report["notes"] == []
    assert sorted(p.name for p in artifact.parent.iterdir() if p.suffix == ".gguf") == ["model-q4_k_m.gguf"]


def kquant_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": a.split(".")[0]}],
             "completion": [{"role": "assistant", "content": a}]} for a in (ANSWERS * n)[:n]]


@pytest.mark.parametrize("hidden", [64, 128])
def test_compression_records_the_tensor_types_and_the_k_quant_fallbacks(tiny_tokenizer, tmp_path, monkeypatch,
                                                                        hidden):
    """A Q4_K_M of a model whose rows are shorter than 256 is mostly not K-quants: compression.json counts the
    file's tensors per type (read back here with gguf's reader) and says which fell back and why, in a note.
    Random tiny Llamas (untied output): at hidden 128 the FFN has 256 inputs, so ffn_down alone fits the 256-value
    super-blocks (llama.cpp's mix: Q4_K, and Q6_K in the last layer); at hidden 64 no row does."""
    from posttrain.compress.api import compress

    monkeypatch.setenv(LIBRARY_ENV, str(require_libllama()))
    src = save_pretrained(make_tiny_llama(tiny_tokenizer, hidden=hidden), tiny_tokenizer, tmp_path / "src")
    rows = kquant_rows(24)
    report = compress(str(src), "gguf:q4_k_m", tmp_path / "out", rows[:16], heldout=rows[16:])
    artifact = Path(report["artifact"])
    types = tensor_types(artifact)
    counts = {t: list(types.values()).count(t) for t in sorted(set(types.values()))}
    assert report["details"]["tensor_types"] == counts == {
        64: {"F32": 5, "Q5_0": 13, "Q8_0": 3}, 128: {"F32": 5, "Q4_K": 1, "Q5_0": 12, "Q6_K": 1, "Q8_0": 2}}[hidden]
    k_quants = {n: t for n, t in types.items() if t.endswith("_K")}
    assert k_quants == ({"blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K"} if hidden == 128 else {})
    matrices = sum(not n.endswith("norm.weight") for n in types)  # token_embd, output and 7 per layer
    assert matrices == 16 and counts["F32"] == 5
    fell = {n: t for n, t in types.items() if not n.endswith("norm.weight") and n not in k_quants}
    written = {t: list(fell.values()).count(t) for t in sorted(set(fell.values()))}
    assert set(written) == {"Q5_0", "Q8_0"}  # llama.cpp's 32-value stand-ins for Q4_K and Q6_K
    rows_of = {64: [64, 128], 128: [128]}[hidden]  # hidden 64: ffn_down rows are 128 values long
    note = (f"Q4_K_M: {len(fell)} of 16 weight matrices were not written as K-quants ("
            + ", ".join(f"{n} at {t}" for t, n in written.items())
            + f"): their rows ({', '.join(map(str, rows_of))} values) are not a multiple of the 256-value K-quant "
              "block")
    assert report["details"]["fallback"] == {"tensors": len(fell), "of": 16, "types": written, "row_sizes": rows_of,
                                             "block": 256, "short_rows": len(fell), "note": note}
    assert report["notes"] == [note]
    assert len(fell) == {64: 16, 128: 14}[hidden]
