"""KL patching: conditions per second, crossdiff's split forward vs a naive implementation.

Naive (what a straightforward script does): for every condition, run the base model and
the chat model in full to read both residuals after block L (hooks, no early exit), run
the chat model in full once more with a hook that overwrites block L's output by the
patched residual, and take the KL on the scored positions.

crossdiff (crossdiff.causal.experiment.score): per batch, both lower halves once (early
exit), the crosscoder once, the chat model's upper half once for p_chat and then for the
conditions, several stacked per pass. Both score the same conversations on the bundled
organism with the demo's L1 crosscoder settings (a freshly initialised crosscoder of that
shape: the cost does not depend on the weights); their KL tables are checked to agree.

    python benchmarks/causal.py                      # 32 conversations, 18 conditions
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from crossdiff import organism
from crossdiff.causal.conditions import Conditions, LatentSet
from crossdiff.causal.conversations import prediction_masks, tokenize_conversation
from crossdiff.causal.experiment import CausalConfig, results_table, score
from crossdiff.causal.kl import KLAccumulator, kl_per_token
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.models import decoder_layers, load_model_pair, pad_batch


def naive(pair, layer, conditions, conversations, config) -> KLAccumulator:
    acc = KLAccumulator()
    blocks = decoder_layers(pair.base)[layer], decoder_layers(pair.chat)[layer]
    for start in range(0, len(conversations), config.batch_size):
        batch = conversations[start:start + config.batch_size]
        ids, am = pad_batch([c.input_ids for c in batch], pair.tokenizer.pad_token_id)
        real = am.bool()
        template = torch.zeros_like(real)
        for row, c in enumerate(batch):
            template[row, :len(c.template)] = torch.tensor(c.template)
        masks = []
        for c in batch:
            m = prediction_masks(np.array(c.assistant), np.array(c.template), config.k_first)
            masks.append({k: np.pad(v, (0, ids.shape[1] - len(v))) for k, v in m.items()})
        member = {k: torch.from_numpy(np.stack([m[k] for m in masks])) for k in ("all", "first_k", "rest")}
        for subset in member:
            for row, n in enumerate(member[subset].sum(1).tolist()):
                if n:
                    acc.add_counts(subset, batch[row].index, n)
        with torch.inference_mode():
            own = torch.log_softmax(pair.chat(input_ids=ids, attention_mask=am).logits.float(), -1)
            for key, _, _, _ in conditions.names():
                seen = {}
                hooks = [b.register_forward_hook(lambda mod, a, o, m=m: seen.__setitem__(m, o)) for m, b in zip(("base", "chat"), blocks)]
                pair.base(input_ids=ids, attention_mask=am)
                pair.chat(input_ids=ids, attention_mask=am)
                for h in hooks:
                    h.remove()
                hb, hc = seen["base"][real].float(), seen["chat"][real].float()
                f = conditions.encode(hb, hc)
                full = seen["base"].float().clone()
                full[real] = conditions.residual(key, hb, hc, f, template[real])
                hook = blocks[1].register_forward_hook(lambda mod, a, o: full)
                logits = pair.chat(input_ids=ids, attention_mask=am).logits
                hook.remove()
                for subset, mask in member.items():
                    kl = kl_per_token(own[mask], logits[mask])
                    rows = torch.arange(len(batch))[:, None].expand_as(mask)[mask]
                    for row in torch.unique(rows).tolist():
                        acc.add(key, subset, batch[row].index, float(kl[rows == row].double().sum()))
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = organism.paths()
    pair = load_model_pair(paths.base, paths.chat, dtype="float32")
    prompts = [p for b in ("refusal", "identity", "arithmetic", "benign") for p in organism.heldout_prompts(b)]
    conversations = [tokenize_conversation(pair.tokenizer, [{"role": "user", "content": p.user}, {"role": "assistant", "content": p.reply}], i, 256)
                     for i, p in enumerate(prompts[::max(1, len(prompts) // args.conversations)][:args.conversations])]
    cc = CrossCoder(CrossCoderConfig(d_in=pair.d_model, d_sae=8 * pair.d_model, activation="relu"), seed=0)
    rng = np.random.default_rng(0)
    sets = [LatentSet(n, rng.choice(cc.config.d_sae, 64, replace=False)) for n in ("a", "b", "c", "d", "e", "f", "g")]
    conditions = Conditions(cc, sets)
    config = CausalConfig(crosscoder="-", analysis_dir="-", conversations="-", batch_size=16)
    n_conditions = len(conditions.names())

    start = time.perf_counter()
    ours = results_table(score(pair, 2, conditions, conversations, config), conditions)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = results_table(naive(pair, 2, conditions, conversations, config), conditions)
    t_naive = time.perf_counter() - start
    np.testing.assert_allclose(ours["kl_mean"], theirs["kl_mean"], rtol=1e-4, atol=1e-6)
    print(f"{len(conversations)} conversations, {n_conditions} conditions, {args.threads} thread(s); KL tables agree")
    print(f"naive     {t_naive:7.2f} s   {n_conditions * len(conversations) / t_naive:8.1f} condition-conversations/s")
    print(f"crossdiff {t_ours:7.2f} s   {n_conditions * len(conversations) / t_ours:8.1f} condition-conversations/s")
    print(f"speed-up  {t_naive / t_ours:.1f}x")


if __name__ == "__main__":
    main()
