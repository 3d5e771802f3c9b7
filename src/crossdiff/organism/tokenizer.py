"""The organism's tokenizer: a byte-level BPE trained on the pretraining text, plus a
Gemma-like chat template whose turn markers are special tokens.

Both models use the very same tokenizer files. The turn markers are in the base model's
vocabulary from the start but never occur in its training inputs, which is the situation
of a real base model whose chat template tokens were reserved but unused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = (PAD, BOS, EOS, START_OF_TURN, END_OF_TURN)  # ids 0..4, in this order
VOCAB_SIZE = 4096

# Gemma's layout: "assistant" is rendered as "model"; a system message is refused.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant', 'model'] %}"
    "{{ raise_exception('roles must be user and assistant (or model); got ' + message['role']) }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in Python, for building training data fast; a test keeps the two equal."""
    parts = [BOS]
    for message in messages:
        role = "model" if message["role"] == "assistant" else message["role"]
        parts.append(f"{START_OF_TURN}{role}\n{message['content'].strip()}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``texts`` and wrap it for transformers."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # Like Gemma, plain encoding starts every text with <bos>; chat renderings carry their
    # own <bos>, so they are encoded with add_special_tokens=False.
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
        model_max_length=256,
        padding_side="left",  # generation pads on the left; training builds its own batches
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
