"""Real llama.cpp (prebuilt, from the npm package node-llama-cpp) runs our GGUF files: it tokenizes like Hugging Face
for every pre-tokenizer we map, and computes what the HF model computes. Skipped when node or the package is absent
(.ci/run installs it: `npm install --prefix .cache/node-llama-cpp node-llama-cpp@<pinned>`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_gguf import CORPUS, TEXTS, build
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from posttrain.align.engine import TrainOptions
from posttrain.align.sft import train_sft
from posttrain.compress.gguf_export import export_gguf

REPO = Path(__file__).resolve().parents[2]
PREFIX = Path(os.environ.get("POSTTRAIN_NODE_LLAMA_CPP", REPO / ".cache" / "node-llama-cpp"))
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


def sft_model(tokenizer, directory: Path) -> Path:
    """A tiny Llama (GQA, tied embeddings) trained a few SFT steps to answer by heart, so its logits are peaky."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    rows = [{"prompt": [{"role": "user", "content": a.split(".")[0]}],
             "completion": [{"role": "assistant", "content": a}]} for a in ANSWERS]
    train_sft(model, tokenizer, rows, TrainOptions(steps=60, batch_size=4, lr=1e-2, schedule="constant"))
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
