"""GGUF export: transformers reads the F32 file back to the same logits and token ids; quantized tensors are
within their quantization step; metadata and tensor names are llama.cpp's; the pre-tokenizer mapping; K-quants."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer,
                          MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from posttrain.compress.gguf_export import export_gguf, rope_interleave
from posttrain.compress.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name
from posttrain.models.tokenizer_builder import build_tokenizer

CORPUS = [f"Question {i}: what's {i} plus {i * 7}? It's {i * 8}. The quick brown fox, don't it?\n"
          f"Naïve café — {i * 13} apples;  two  spaces\tand tab. I'LL pay ${i}.50 now! Total:  {i}  items."
          for i in range(150)]
# Compared with transformers' rebuilt tokenizer (see test_f32_round_trip for why these avoid spaces before digits).
TEXTS = ["Hello world! It's 2024, and I'LL pay $1234.56 for 3 apples.", "line one\n\nline  two\t tab",
         "naïve café — déjà vu 中文 🙂", "don't stop x1y22z333"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# initializer_range 0.1 (HF default 0.02) makes random attention sharp enough that a wrong rotary layout shows
# clearly in llama.cpp's logits (test_gguf_llamacpp.py).
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


def byte_level_tokenizer(pre, normalizer=None, vocab_size=420) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here, with ChatML specials, a non-special added token and a chat template."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_tokens(["<think>"])  # USER_DEFINED in GGUF
    tok.chat_template = CHATML
    return tok


def gpt2_tokenizer():
    return byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))


def split_tokenizer(pattern, normalizer=None):
    return byte_level_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), normalizer)


def spm_tokenizer():
    """A SentencePiece-style BPE (byte fallback, <0xNN> pieces, '▁' for spaces) as Llama-2 / Mistral ship."""
    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(trainer.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in learned["merges"]], add_bos_token=True)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                         " [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}"
                         "{{ raise_exception('only user and assistant') }}{% endif %}{% endfor %}")
    return tok


def save(directory: Path, model, tokenizer) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build(kind: str, directory: Path) -> Path:
    """A tiny random model of one family with one tokenizer kind, saved to `directory`."""
    torch.manual_seed(0)
    if kind == "qwen2":
        tok = split_tokenizer(QWEN2_SPLIT, normalizers.NFC())
        cfg = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, use_sliding_window=False, **SHAPE)
        return save(directory, Qwen2ForCausalLM(cfg).eval(), tok)
    if kind == "mistral-spm":
        tok = spm_tokenizer()
        cfg = MistralConfig(vocab_size=len(tok), sliding_window=None, bos_token_id=1, eos_token_id=2, **SHAPE)
        return save(directory, MistralForCausalLM(cfg).eval(), tok)
    # posttrain: its own builder, on a corpus with runs of spaces before digits, where its digit splitting shows.
    tok = {"gpt2": gpt2_tokenizer, "posttrain": lambda: build_tokenizer(CORPUS, vocab_size=420),
           "llama3": lambda: split_tokenizer(LLAMA3_SPLIT)}[kind]()
    # gpt2: embeddings padded past the vocabulary (to a multiple of 64), as many checkpoints are.
    n_vocab = -(-len(tok) // 64) * 64 if kind == "gpt2" else len(tok)
    cfg = LlamaConfig(vocab_size=n_vocab, tie_word_embeddings=kind == "posttrain", bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPE)
    return save(directory, LlamaForCausalLM(cfg).eval(), tok)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {k: build(k, root / k) for k in ("gpt2", "posttrain", "qwen2", "mistral-spm")}


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("kind", ["gpt2", "posttrain", "qwen2", "mistral-spm"])
def test_f32_round_trip_through_transformers(model_dirs, kind, tmp_path):
    src = model_dirs[kind]
    path = export_gguf(src, tmp_path / f"{kind}.gguf", "f32")
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor([tok(" ".join(TEXTS), add_special_tokens=False)["input_ids"][:64]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)  # F32 weights, same math: bit-identical
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # posttrain's digit splitting ("starcoder") has no counterpart in transformers' GGUF tokenizer builder, so it
    # differs from HF only on a run of spaces before a digit (never merged, by construction); TEXTS avoid that.
    for text in TEXTS:
        assert rebuilt(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_metadata_and_tensor_names(model_dirs, tmp_path):
    fields, tensors = read(export_gguf(model_dirs["gpt2"], tmp_path / "m.gguf", "f16"))
    config = LlamaConfig.from_pretrained(model_dirs["gpt2"])
    tok = AutoTokenizer.from_pretrained(model_dirs["gpt2"])
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "gpt2"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    expected = {"block_count": 2, "context_length": 256, "embedding_length": 64, "feed_forward_length": 128,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                "vocab_size": config.vocab_size}
    assert {k: fields[f"llama.{k}"] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == config.vocab_size > len(tok)
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == 3 and types[tok.convert_tokens_to_ids("<think>")] == 4
    assert set(types[len(tok):]) == {5} and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    assert types[tok("The", add_special_tokens=False)["input_ids"][0]] == 1
    first_merge = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"][0]
    assert fields["tokenizer.ggml.merges"][0] == " ".join(first_merge)
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.chat_template"] == CHATML
    names = {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v",
             "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names | {"token_embd.weight", "output_norm.weight", "output.weight"}
    assert all((t.tensor_type == gguf.GGMLQuantizationType.F32) == (len(t.shape) == 1) for t in tensors.values())
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]  # GGUF dims are reversed: ne0 = in_features


def test_tied_qwen2_and_spm_metadata(model_dirs, tmp_path):
    fields, tensors = read(export_gguf(model_dirs["qwen2"], tmp_path / "q.gguf", "f16"))
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert "output.weight" not in tensors and "blk.1.attn_q.bias" in tensors  # tied; qwen2 q/k/v biases
    q = Qwen2ForCausalLM.from_pretrained(model_dirs["qwen2"]).model.layers[1].self_attn.q_proj.weight.detach()
    stored = gguf.quants.dequantize(tensors["blk.1.attn_q.weight"].data, tensors["blk.1.attn_q.weight"].tensor_type)
    assert np.allclose(stored, q.numpy(), atol=1e-3)  # qwen2: NEOX rotary, rows not permuted
    fields, _ = read(export_gguf(model_dirs["mistral-spm"], tmp_path / "s.gguf", "f32"))
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "llama"
    types, tokens = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"]
    assert tokens[3] == "<0x00>" and types[3] == 6 and types[0] == 2 and types[1] == 3
    scores = fields["tokenizer.ggml.scores"]
    merged = [i for i, t in enumerate(tokens) if t.startswith("\u2581") and len(t) > 2]
    assert merged and all(scores[i] <= 0 for i in merged) and len({scores[i] for i in merged}) == len(merged)
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is True


def test_posttrain_tokenizer_maps_to_starcoder(model_dirs, tmp_path):
    fields, tensors = read(export_gguf(model_dirs["posttrain"], tmp_path / "p.gguf", "q8_0"))
    assert fields["tokenizer.ggml.pre"] == "starcoder" and "output.weight" not in tensors


def test_rope_interleave_moves_the_second_half_next_to_the_first():
    rows = np.arange(16, dtype=np.float32).reshape(16, 1)  # 2 heads of 8 rows
    got = rope_interleave(rows, 2)[:, 0].astype(int).tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_pre_tokenizer_mapping_and_fallback(model_dirs, tmp_path):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    # Our regex constants are the ones transformers' own GGUF reader associates with the same names.
    assert GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"] == LLAMA3_SPLIT and GGUF_PRE_TOKENIZER_SPLITS["qwen2"] == QWEN2_SPLIT
    as_json = lambda tok: json.loads(tok.backend_tokenizer.to_str())  # noqa: E731
    assert pre_tokenizer_name(as_json(split_tokenizer(LLAMA3_SPLIT))) == "llama-bpe"
    assert pre_tokenizer_name(as_json(byte_level_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)])))) is None
    odd = byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True))
    odd_dir = save(tmp_path / "odd", LlamaForCausalLM(LlamaConfig(vocab_size=len(odd), **SHAPE)), odd)
    with pytest.warns(UserWarning, match="unrecognised pre-tokenizer"):
        fields, _ = read(export_gguf(odd_dir, tmp_path / "odd.gguf", "f16"))
    assert fields["tokenizer.ggml.pre"] == "default"
    fields, _ = read(export_gguf(odd_dir, tmp_path / "odd2.gguf", "f16", pre_tokenizer="gpt-2"))
    assert fields["tokenizer.ggml.pre"] == "gpt-2"


def _steps(original: np.ndarray, stored, qtype) -> tuple[np.ndarray, np.ndarray]:
    """Per element: |dequantized - original| and the bound for it (half the block's step, one step for a value
    the 4-bit range clips, plus the rounding of the step to fp16 times the level)."""
    blocks = original.reshape(-1, 32).astype(np.float32)
    deq = gguf.quants.dequantize(stored, qtype).reshape(-1, 32)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        levels, clipped = np.round(blocks / np.where(step == 0, 1, step)), np.zeros_like(blocks, dtype=bool)
    else:  # Q4_0: the step is the signed extreme / -8, levels -8..7; the opposite extreme may clip from 8 to 7
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        signed = extreme / -8
        step = np.abs(signed)
        levels = blocks / np.where(signed == 0, 1, signed)
        clipped = levels > 7.5
    step16 = step.astype(np.float16).astype(np.float32)
    bound = np.where(clipped, 1.0, 0.5) * step + (np.abs(levels) + 0.5) * np.abs(step - step16) + 1e-7
    return np.abs(deq - blocks), bound


def test_bf16_is_the_rounded_weight(model_dirs, tmp_path):
    _, tensors = read(export_gguf(model_dirs["qwen2"], tmp_path / "b.gguf", "bf16"))
    weight = Qwen2ForCausalLM.from_pretrained(model_dirs["qwen2"]).model.layers[0].mlp.down_proj.weight.detach()
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), weight.bfloat16().float().numpy())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_tensors_within_half_a_step(model_dirs, qtype, tmp_path):
    src = model_dirs["gpt2"]
    _, tensors = read(export_gguf(src, tmp_path / "q.gguf", qtype))
    model = LlamaForCausalLM.from_pretrained(src)
    cfg = model.config
    from posttrain.compress.gguf_export import gguf_tensor_name

    checked = 0
    for name, weight in model.state_dict().items():
        t = tensors[gguf_tensor_name(name)]
        array = weight.float().numpy()
        if ".attn_q." in t.name or ".attn_k." in t.name:  # the file holds llama.cpp's rotary row order
            array = rope_interleave(array, cfg.num_attention_heads if ".attn_q." in t.name else cfg.num_key_value_heads)
        if array.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(t.data, array)
            continue
        expected_type = "Q8_0" if qtype == "Q4_0" and t.name == "output.weight" else qtype
        assert t.tensor_type == gguf.GGMLQuantizationType[expected_type]
        err, bound = _steps(array, t.data, t.tensor_type)
        assert (err <= bound).all(), (t.name, float((err - bound).max()))
        checked += 1
    assert checked == 2 * 7 + 2


def no_libllama(monkeypatch, tmp_path: Path) -> None:
    """Neither $POSTTRAIN_LIBLLAMA nor a node-llama-cpp install (the checkout's .cache may hold one)."""
    monkeypatch.delenv("POSTTRAIN_LIBLLAMA", raising=False)
    monkeypatch.setenv("POSTTRAIN_NODE_LLAMA_CPP", str(tmp_path / "no-node-llama-cpp"))


def test_kquant_needs_llama_cpp(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    no_libllama(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="llama-cpp-python.*llama-quantize.*POSTTRAIN_LIBLLAMA"):
        export_gguf(model_dirs["gpt2"], tmp_path / "k.gguf", "Q4_K_M")
    assert not (tmp_path / "k.gguf").exists()


def test_kquant_libllama_variable_must_name_a_file(model_dirs, tmp_path, monkeypatch):
    """$POSTTRAIN_LIBLLAMA is an explicit choice: a wrong path is an error, never a silent fallback."""
    monkeypatch.setenv("POSTTRAIN_LIBLLAMA", str(tmp_path / "libllama.so"))
    with pytest.raises(RuntimeError, match=f"POSTTRAIN_LIBLLAMA={tmp_path / 'libllama.so'} is not a file"):
        export_gguf(model_dirs["gpt2"], tmp_path / "k.gguf", "Q4_K_M")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the intermediate file


def test_kquant_runs_llama_quantize_from_path(model_dirs, tmp_path, llama_quantize_on_path):
    """With a `llama-quantize` on PATH (here a stand-in recording its arguments), the model is written at its own
    precision next to the output, handed over with the K-quant type name, and the intermediate file removed."""
    out = export_gguf(model_dirs["gpt2"], tmp_path / "out" / "k.gguf", "q6_k")
    args = (tmp_path / "args").read_text().split()
    assert args[1:3] == [str(out), "Q6_K"] and args[0].endswith(".f32.tmp.gguf") and not Path(args[0]).exists()
    assert read(out)[0]["general.file_type"] == gguf.LlamaFileType.ALL_F32  # the stand-in copied its input
    assert sorted(p.name for p in out.parent.iterdir()) == ["k.gguf"]


def test_kquant_uses_llama_cpp_python_when_importable(model_dirs, tmp_path, monkeypatch):
    """llama-cpp-python's API (a stand-in here): default params, ftype set to llama.cpp's file type, rc 0."""
    import ctypes
    import shutil
    import types

    class Params(ctypes.Structure):
        _fields_ = [("ftype", ctypes.c_int), ("nthread", ctypes.c_int)]

    calls = []

    def quantize(src: bytes, dst: bytes, params) -> int:
        calls.append((src.decode(), params._obj.ftype))
        shutil.copy(src.decode(), dst.decode())
        return 0

    fake = types.SimpleNamespace(llama_model_quantize_default_params=Params, llama_model_quantize=quantize)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    monkeypatch.delenv("POSTTRAIN_LIBLLAMA", raising=False)
    out = export_gguf(model_dirs["qwen2"], tmp_path / "k.gguf", "Q4_K_M")
    assert calls[0][1] == gguf.LlamaFileType.MOSTLY_Q4_K_M == 15 and not Path(calls[0][0]).exists()
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["k.gguf"]


def test_unsupported_inputs_are_refused_or_warned(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="qtype"):
        export_gguf(model_dirs["gpt2"], tmp_path / "x.gguf", "q3_k_s")
    tok = gpt2_tokenizer()
    llama3_rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    src = save(tmp_path / "l3", LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), rope_parameters=llama3_rope,
                                                             **SHAPE)), tok)
    with pytest.raises(NotImplementedError, match="llama3"):
        export_gguf(src, tmp_path / "l3.gguf", "f16")
    assert not (tmp_path / "l3.gguf").exists()
    src = save(tmp_path / "sw", MistralForCausalLM(MistralConfig(vocab_size=len(tok), sliding_window=128, **SHAPE)), tok)
    with pytest.warns(UserWarning, match="sliding window 128"):
        export_gguf(src, tmp_path / "sw.gguf", "f16")
