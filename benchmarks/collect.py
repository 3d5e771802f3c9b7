"""Collection throughput: `crossdiff collect` against a naive full forward, same models, texts, run.

Both sides start from token ids and end with paired activations of the middle layer:

- crossdiff: ``collect()`` end to end: load both models, early exit after the block
  (later blocks and the LM head never run), write the bf16 cache with checksums and
  statistics.
- naive: load both models, full forward with ``output_hidden_states=True`` (every layer
  kept, logits computed), pick ``hidden_states[layer + 1]`` at the real tokens, cast to
  bf16 on the CPU; nothing is written to disk.

The models are random-init Llama-shaped (12 blocks, d_model 512, a 32k-row vocabulary
like Llama's), saved to a temporary folder and loaded the way users load theirs, or with
``--real-pair`` the SmolLM2-135M-Instruct LoRA organism (30 blocks, d_model 576, vocabulary
49,152; the adapter merged), collected at block 15. Each side runs ``--repeats`` times,
interleaved (the first naive run also pays one-off import and allocator costs); the best
time of each is reported.

    python benchmarks/collect.py [--layers 12] [--d-model 512] [--docs 12] [--device cpu]
    python benchmarks/collect.py --real-pair [--docs 12]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import build_tiny_tokenizer  # noqa: E402  (a small BPE tokenizer with a chat template)

from crossdiff.collect.collector import CollectConfig, collect  # noqa: E402
from crossdiff.config import from_dict  # noqa: E402
from crossdiff.models import load_model, load_tokenizer_of, pad_batch  # noqa: E402
from crossdiff.texts import iter_documents  # noqa: E402

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "model chat user assistant question answer please write poem sea wind paris rome capital numbers"
).split()


def build_models(root: Path, layers: int, d_model: int, vocab: int) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=int(2.75 * d_model), num_hidden_layers=layers,
        num_attention_heads=d_model // 64, num_key_value_heads=d_model // 64, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    paths = []
    for role, seed in (("base", 0), ("chat", 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        paths.append(root / role)
    return paths[0], paths[1]


def write_texts(root: Path, docs: int) -> dict[str, Path]:
    rng = random.Random(0)
    web, chat = root / "web.txt", root / "chat.jsonl"
    web.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 260))) + "\n" for _ in range(docs)))
    with open(chat, "w") as f:
        for _ in range(docs):
            turns = [
                {"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))}
                for role in ("user", "assistant")
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return {"web": web, "chat": chat}


def naive(config: CollectConfig) -> tuple[int, float]:
    """Tokens and seconds for the naive path (including model loading, like collect())."""
    start = time.perf_counter()
    models = [load_model(spec, role, config.model_dtype, config.device) for spec, role in ((config.base, "base"), (config.chat, "chat"))]
    tokenizer = load_tokenizer_of(config.chat)
    tokens = 0
    for source in config.sources:
        docs = list(iter_documents(source, tokenizer, config.max_len))
        for i in range(0, len(docs), config.batch_size):
            batch = docs[i : i + config.batch_size]
            input_ids, attention_mask = pad_batch([d.input_ids for d in batch], tokenizer.pad_token_id)
            keep = attention_mask.bool()
            with torch.inference_mode():
                outs = [
                    m(input_ids=input_ids.to(config.device), attention_mask=attention_mask.to(config.device),
                      output_hidden_states=True).hidden_states[config.layer + 1][keep.to(config.device)]
                    for m in models
                ]
            pair = torch.stack(outs, dim=1).to(torch.bfloat16).cpu()
            tokens += len(pair)
    if config.device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--docs", type=int, default=12, help="documents per source (web and chat)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--real-pair", action="store_true", help="SmolLM2-135M-Instruct and its LoRA organism, layer 15")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.real_pair:
            from crossdiff.organism import smollm2

            base, chat = smollm2.pair_specs()
            args.layers, args.d_model, args.vocab = 30, 576, 49152
        else:
            base, chat = build_models(root, args.layers, args.d_model, args.vocab)
        texts = write_texts(root, args.docs)

        def config(out: str) -> CollectConfig:
            return from_dict(CollectConfig, {
                "base": str(base), "chat": str(chat), "layer": args.layers // 2, "out": out,
                "sources": [
                    {"name": "web", "kind": "text", "path": str(texts["web"])},
                    {"name": "chat", "kind": "chat", "path": str(texts["chat"]), "column": "messages"},
                ],
                "max_len": args.max_len, "batch_size": args.batch_size, "model_dtype": args.model_dtype,
                "device": args.device, "shard_tokens": 2**14,
            })

        ours_s, naive_s, tokens = [], [], None
        for repeat in range(args.repeats):
            n, seconds = naive(config(""))
            naive_s.append(seconds)
            start = time.perf_counter()
            summary = collect(config(str(root / f"cache-{repeat}")), quiet=True)
            ours_s.append(time.perf_counter() - start)
            tokens = sum(summary.tokens_per_source.values())
            assert tokens == n, (tokens, n)

    ours, base_rate = tokens / min(ours_s), tokens / min(naive_s)
    shape = "SmolLM2-135M-Instruct and its LoRA organism" if args.real_pair else "Llama-shaped, random init"
    print(f"model: {shape}, {args.layers} blocks, d_model {args.d_model}, vocab {args.vocab}, "
          f"{args.model_dtype} on {args.device}; layer {args.layers // 2}; {tokens} tokens "
          f"({args.docs} web + {args.docs} chat documents, max_len {args.max_len}, batch {args.batch_size})")
    print(f"naive full forward (output_hidden_states): {base_rate:,.0f} tokens/s (best of {naive_s})")
    print(f"crossdiff collect (early exit, cache written): {ours:,.0f} tokens/s (best of {ours_s})")
    print(f"ratio: {ours / base_rate:.2f}x")


if __name__ == "__main__":
    main()
