"""Train a small byte-level BPE tokenizer with a chat template, for the embedded model.

Guarantees of the returned ``PreTrainedTokenizerFast``:
- byte-level: any text encodes (no unknown token) and ``decode(encode(text))`` gives the text back;
- digits are split one per token before BPE (so numbers are spelled digit by digit, which tiny models learn
  arithmetic on far more easily than on multi-digit merges);
- special tokens: bos ``<s>``, eos ``</s>``, pad ``<pad>`` (distinct from eos, so padding can never be confused
  with an end of turn) and the role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``;
- encoding plain text adds NO special tokens (no BOS, no EOS): the chat template writes the one BOS itself, so
  ``tokenizer(apply_chat_template(..., tokenize=False), add_special_tokens=False)`` has exactly one BOS;
- the chat template is ``CHAT_TEMPLATE``: every assistant turn ends with eos; the newline written after other turns is removed by
  transformers' Jinja settings (trim_blocks), so a user turn runs straight into the next role marker; and the
  rendered generation prompt is a prefix of the rendered conversation. Because the special tokens and the
  pre-tokenizer split at the turn boundary (``<|assistant|>`` is special, ``\\n`` is its own pre-token before
  text), tokenizing the prompt and the completion separately and concatenating gives the same ids as tokenizing
  the whole conversation;
- deterministic: the same corpus and vocab size give the same vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, model_max_length: int = 4096
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of (at most) ``vocab_size`` tokens on ``corpus``, special tokens included.

    ``model_max_length`` is recorded for transformers' length warnings: give the model's position limit.

    The special tokens take ids 0..5 in the order bos, eos, pad, system, user, assistant; the 256 byte symbols
    come next (byte-level BPE always keeps them, so ``vocab_size`` must be at least 262 + some merges).
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS) + 256} special + byte tokens")
    backend = Tokenizer(models.BPE())
    # Digits first, then byte-level (which also applies the GPT-2 word regex); no prefix space, so a text is
    # encoded the same whether or not it starts a turn.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    # No post-processor: plain encoding adds nothing; the chat template supplies the BOS.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
