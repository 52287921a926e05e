"""Shared fixtures for the evaluation tests: a second architecture (GPT-2, learned positions) with a byte-level BPE
of its own, so that no benchmark is tied to the Llama fixtures' tokenizer."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# Role-tagged turns: distinct from the plain-text rendering (contents joined by blank lines), so a test can tell
# that the chat template was used.
GPT2_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


def build_gpt2_and_bpe(datasets_dir, chat_template=None, n_positions=80):
    """GPT-2 with a byte-level BPE trained here, GPT-2 style: one <|endoftext|>, no pad, no chat template unless
    one is given."""
    files = sorted((datasets_dir / "mmlu" / "dev").iterdir())[:20]
    corpus = [line for p in files for line in p.read_text().splitlines()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    if chat_template is not None:
        tok.chat_template = chat_template
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2,
                                       n_head=4)).eval()
    return model, tok


@pytest.fixture(scope="module")
def gpt2_and_bpe(datasets_dir):
    return build_gpt2_and_bpe(datasets_dir)


@pytest.fixture(scope="module")
def gpt2_builder():
    """`build_gpt2_and_bpe` itself, for tests that need other settings. A fixture, because `from conftest import`
    inside a test resolves to whichever conftest module was imported last (tests/live has one too)."""
    return build_gpt2_and_bpe


@pytest.fixture(scope="module")
def gpt2_chat(datasets_dir):
    """The same GPT-2 and BPE, its tokenizer given a chat template (for MT-Bench's chat-rendered answers)."""
    return build_gpt2_and_bpe(datasets_dir, chat_template=GPT2_CHAT_TEMPLATE)
