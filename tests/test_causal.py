"""KL patching: scored positions on each template, identities on tiny models, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_tiny_tokenizer
from crossdiff.causal.conditions import Conditions, LatentSet, candidate_pool, paper_sets
from crossdiff.causal.conversations import prediction_masks, tokenize_conversation
from crossdiff.causal.experiment import CausalConfig, results_table, score
from crossdiff.causal.kl import kl_per_token, weighted_mean_ci
from crossdiff.causal.upper import SplitModel
from crossdiff.cli import main
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.models import load_model_pair, pad_batch

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
          " + '<|eot_id|>' }}{% endfor %}")
TEMPLATES = {
    "gemma": (None, [], "<end_of_turn>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
}
CONVERSATION = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Sure thing"},
    {"role": "user", "content": "Again please"},
    {"role": "assistant", "content": "Yes"},
]


@pytest.fixture(scope="module", params=list(TEMPLATES))
def template_tokenizer(request, tmp_path_factory, tiny_tokenizer):
    template, extra, end = TEMPLATES[request.param]
    if template is None:
        return tiny_tokenizer, end
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp(request.param)
    build_tiny_tokenizer(path, chat_template=template, extra_tokens=extra)
    return AutoTokenizer.from_pretrained(path), end


def test_scored_positions_on_each_template(template_tokenizer):
    tokenizer, end = template_tokenizer
    conv = tokenize_conversation(tokenizer, CONVERSATION, 0, 1024)
    pieces = [tokenizer.decode([t]) for t in conv.input_ids]
    assistant_runs = _runs(conv.assistant)
    assert ["".join(pieces[a:b]) for a, b in assistant_runs] == [f"Sure thing{end}", f"Yes{end}"]
    masks = prediction_masks(np.array(conv.assistant), np.array(conv.template), k=2)
    # Position t is scored when token t+1 is the assistant's: one to the left of every run.
    assert _runs(masks["all"]) == [(a - 1, b - 1) for a, b in assistant_runs]
    for a, b in assistant_runs:
        assert conv.template[a - 1]  # the template token before the answer predicts its first token ...
        assert not masks["first_k"][a - 1] and masks["rest"][a - 1]  # ... and is left out of first k
    first = np.flatnonzero(masks["first_k"])
    assert [pieces[i] for i in first] == [pieces[assistant_runs[0][0]], pieces[assistant_runs[1][0]]]  # k=2 minus the template
    assert not (masks["first_k"] & masks["rest"]).any() and ((masks["first_k"] | masks["rest"]) == masks["all"]).all()


def test_first_k_counts_per_turn_and_batch_rows():
    assistant = np.array([[0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=bool)
    template = np.zeros_like(assistant)
    template[:, 1] = True
    masks = prediction_masks(assistant, template, k=3)
    assert masks["first_k"][0].nonzero()[0].tolist() == [2, 3, 7, 8, 9]  # position 1 is template
    assert masks["first_k"][1].nonzero()[0].tolist() == [0, 2]
    assert masks["rest"][1].nonzero()[0].tolist() == [1, 3, 4, 5, 6, 7]


def test_no_assistant_turn_is_one_line(tiny_tokenizer):
    from crossdiff.errors import CrossdiffError

    with pytest.raises(CrossdiffError, match="conversation 3 has no assistant turn"):
        tokenize_conversation(tiny_tokenizer, CONVERSATION[:1], 3, 1024)


def test_weighted_mean_and_cluster_interval_brute_force():
    rng = np.random.default_rng(0)
    kl = [rng.exponential(size=n) for n in (3, 7, 1, 12, 5)]
    mean, low, high = weighted_mean_ci([k.sum() for k in kl], [len(k) for k in kl])
    assert mean == pytest.approx(np.concatenate(kl).mean())
    # Brute force: the ratio estimator's standard error from conversation totals.
    n = np.array([len(k) for k in kl]); s = np.array([k.sum() for k in kl])
    se = np.sqrt(len(n) / (len(n) - 1) * ((s - mean * n) ** 2).sum()) / n.sum()
    assert (low, high) == pytest.approx((mean - 1.959964 * se, mean + 1.959964 * se))


def _exact_crosscoder(d: int, input_scale: tuple[float, float]) -> CrossCoder:
    """A relu crosscoder that reconstructs any pair exactly: latents +-x_base_i and +-x_chat_i."""
    cc = CrossCoder(CrossCoderConfig(d_in=d, d_sae=4 * d, activation="relu", input_scale=list(input_scale)))
    eye = torch.eye(d)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_dec.zero_()
        for block, (model, sign) in enumerate(((0, 1), (0, -1), (1, 1), (1, -1))):
            cols = slice(block * d, (block + 1) * d)
            cc.W_enc[model, :, cols] = sign * eye
            cc.W_dec[cols, model, :] = sign * eye
    return cc


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_identities_on_tiny_models(tiny_model_pairs, arch):
    pair = load_model_pair(*tiny_model_pairs[arch], dtype="float32")
    layer = 1
    conversations = [tokenize_conversation(pair.tokenizer, c, i, 1024) for i, c in enumerate([
        CONVERSATION,
        [{"role": "user", "content": "Write a short poem about the sea."}, {"role": "assistant", "content": "The wind and the sea, again and again."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How are you today?"}],
    ])]
    cc = _exact_crosscoder(pair.d_model, (2.0, 0.5))
    random_half = LatentSet("half", np.arange(0, 4 * pair.d_model, 2))
    conditions = Conditions(cc, [random_half])
    config = CausalConfig(crosscoder="-", analysis_dir="-", conversations="-", batch_size=2, k_first=3)
    table = results_table(score(pair, layer, conditions, conversations, config), conditions)
    kl = table.set_index(["condition", "form", "subset"])["kl_mean"]
    assert kl["None", None, "all"] > 1e-3  # base and chat really differ
    assert abs(kl["All", None, "all"]) < 1e-6  # exact reconstruction: All is the chat residual
    assert kl["eps_chat", None, "all"] == pytest.approx(kl["None", None, "all"], abs=1e-6)  # ... and eps_chat the base one

    # None, recomputed independently: the base residual from output_hidden_states, fed to
    # the full chat model through a hook that overwrites block L's output.
    input_ids, attention_mask = pad_batch([c.input_ids for c in conversations], pair.tokenizer.pad_token_id)
    scored = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, c in enumerate(conversations):
        scored[row, :len(c.input_ids)] = torch.from_numpy(prediction_masks(np.array(c.assistant), np.array(c.template), 3)["all"])
    with torch.inference_mode():
        own = pair.chat(input_ids=input_ids, attention_mask=attention_mask).logits
        base_resid = pair.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[layer + 1]
        from crossdiff.models import decoder_layers

        handle = decoder_layers(pair.chat)[layer].register_forward_hook(lambda m, a, o: base_resid)
        try:
            patched = pair.chat(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            handle.remove()
    logp_chat = torch.log_softmax(own[scored], dim=-1)
    assert kl["None", None, "all"] == pytest.approx(float(kl_per_token(logp_chat, patched[scored]).mean()), rel=1e-5)
    # The chat residual patched into the chat model gives KL 0.
    split = SplitModel(pair.chat, layer)
    chat_resid = split.lower(input_ids, attention_mask)
    assert float(kl_per_token(logp_chat, split.upper(chat_resid, input_ids, attention_mask, scored)).abs().max()) < 1e-6
    assert table["n_tokens"][table.subset == "all"].iloc[0] == int(scored.sum())
    # One condition per upper pass gives the same numbers as conditions stacked in one pass.
    config.tokens_per_pass = 1
    single = results_table(score(pair, layer, conditions, conversations, config), conditions)
    np.testing.assert_allclose(single["kl_mean"], table["kl_mean"], rtol=1e-5, atol=1e-7)


def test_paper_sets_and_pool_fallback():
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 40
    table = pd.DataFrame({"latent": np.arange(n), "dnorm": np.linspace(0.5, 0.99, n), "dead": False,
                          "nu_error": rng.uniform(0, 1, n), "nu_recon": rng.uniform(0, 1, n), "tag": "other"})
    table.loc[3, "dead"] = True
    table.loc[[36, 37, 38, 39], "nu_error"] = 5.0  # out of the nu range: never in the pool
    pool = candidate_pool(table, pool_size=10)
    assert pool.rule == "top-dnorm" and "using the 10 most chat-leaning" in pool.note
    assert pool.latents.tolist() == list(range(35, 25, -1))
    sets = {s.name: s.latents for s in paper_sets(table, pool, random_seeds=2)}
    assert sets["dnorm-top"].tolist() == [35, 34, 33, 32, 31] and sets["dnorm-bottom"].tolist() == [30, 29, 28, 27, 26]
    rank = (table.loc[pool.latents, "nu_recon"].rank() + table.loc[pool.latents, "nu_error"].rank()).sort_values(kind="stable")
    assert sets["ls-best"].tolist() == rank.index[:5].tolist() and sets["ls-worst"].tolist() == rank.index[-5:].tolist()
    assert len(sets["random-0"]) == 5 and set(sets["random-1"]) <= set(pool.latents)
    assert candidate_pool(table, pool_size=3).rule == "chat-only"  # 4 usable latents above dnorm 0.9

def _runs(mask) -> list[tuple[int, int]]:
    mask = list(np.asarray(mask, dtype=bool))
    runs, start = [], None
    for i, flag in enumerate(mask + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_answer_start_contrast_equals_a_brute_force_mean(tiny_model_pairs):
    from crossdiff.causal.steer import answer_start_contrast

    pair = load_model_pair(*tiny_model_pairs["llama"], dtype="float32")
    layer = 1
    cc = CrossCoder(CrossCoderConfig(d_in=pair.d_model, d_sae=24, activation="relu", layer=layer, input_scale=[2.0, 0.5]), seed=3)
    with torch.no_grad():
        cc.W_enc.mul_(100.0)  # the tiny models' residuals are small: more latents active, and differently per prompt
    prompts, others = ["Write a poem about the sea.", "Hi"], ["How are you today?", "Tell me a story.", "Again please"]
    table = answer_start_contrast(cc, pair, prompts, others)

    def brute_force(texts):  # full forwards with output_hidden_states, one latent at a time
        rows = []
        for text in texts:
            rendered = pair.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([pair.tokenizer(rendered, add_special_tokens=False)["input_ids"]])
            with torch.inference_mode():
                x = torch.stack([m(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0, -1] for m in (pair.base, pair.chat)])
            x = x.double() * torch.tensor([2.0, 0.5], dtype=torch.float64)[:, None]
            W_enc, b_enc, W_dec = cc.W_enc.detach().double(), cc.b_enc.detach().double(), cc.W_dec.detach().double()
            rows.append([float(torch.relu((x * W_enc[:, :, j]).sum() + b_enc[j]) * W_dec[j].norm(dim=-1).sum()) for j in range(24)])
        return np.mean(rows, axis=0)

    by_latent = table.set_index("latent").sort_index()
    for column, texts in (("mean", prompts), ("mean_others", others)):
        expected = brute_force(texts)
        assert (expected > 0).sum() >= 3  # enough active latents for the comparison to mean something
        np.testing.assert_allclose(by_latent[column], expected, rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(by_latent["contrast"], by_latent["mean"] - by_latent["mean_others"])
    assert list(table["contrast"]) == sorted(table["contrast"], reverse=True)


def test_control_sets_and_match_counts():
    import pandas as pd

    from crossdiff.causal.steer import SteerConfig, control_sets, format_match_counts, match_counts
    from crossdiff.errors import CrossdiffError

    cc = CrossCoder(CrossCoderConfig(d_in=4, d_sae=10, activation="relu"), seed=0)
    with torch.no_grad():
        cc.W_dec[7, 1].zero_()  # no chat direction: cannot be steered
    table = pd.DataFrame({"latent": range(10), "max_act": [1.0] * 5 + [0.0] + [1.0] * 4})  # latent 5 never active
    drawn = [int(j) for latents in control_sets(cc, table, 4, 1, exclude={0, 1}, seed=1) for j in latents]
    assert len(set(drawn)) == 4 and not set(drawn) & {0, 1, 5, 7}
    assert [list(s) for s in control_sets(cc, table, 4, 1, exclude={0, 1}, seed=1)] == [[j] for j in drawn]
    pairs = control_sets(cc, table, 3, 2, exclude={0, 1}, seed=1)  # sets as large as the chosen one, disjoint
    assert [len(s) for s in pairs] == [2, 2, 2] and len({int(j) for s in pairs for j in s}) == 6
    with pytest.raises(CrossdiffError, match="only 6 other latents"):
        control_sets(cc, table, 7, 1, exclude={0, 1})
    with pytest.raises(CrossdiffError, match="8 needed for sets of 2"):
        control_sets(cc, table, 4, 2, exclude={0, 1})
    with pytest.raises(CrossdiffError, match="not a regular expression"):
        SteerConfig(crosscoder="-", analysis_dir="-", latents=["1"], expect="(unclosed")

    def row(latent, factor, prompt, matches, unsteered, control):
        return {"latent": latent, "factor": factor, "prompt": prompt, "matches": matches, "unsteered_matches": unsteered, "control": control}

    rows = [row(latent, factor, p, hits[i], p == "a", latent != 3)
            for latent, hits_by_factor in ((3, {1.0: (True, True, False), 2.0: (True, True, True)}),
                                           (8, {1.0: (False, False, False), 2.0: (True, False, False)}))
            for p, i in (("a", 0), ("b", 1), ("c", 2))
            for factor, hits in hits_by_factor.items()]
    counts = match_counts(rows).set_index("set")
    assert counts.loc["3", 1.0] == 2 and counts.loc["3", 2.0] == 3 and counts.loc["8", 2.0] == 1
    assert counts.loc["3", "unsteered"] == 1 and counts.loc["3", "prompts"] == 3 and counts.loc["8", "control"]
    with pytest.raises(CrossdiffError, match="without --expect"):
        match_counts([{**r, "matches": None} for r in rows])
    text = format_match_counts(rows, "cannot")
    assert "of 3 prompts" in text and "control 8" in text


def test_an_interrupted_scoring_resumes_to_the_same_sums(tiny_model_pairs, tmp_path, monkeypatch):
    import crossdiff.causal.experiment as experiment
    from crossdiff.causal.progress import ScoringProgress, fingerprint

    pair = load_model_pair(*tiny_model_pairs["llama"], dtype="float32")
    texts = ["Write a poem.", "Hi", "How are you today, my friend?", "Again please", "Tell me a story about the sea and the wind."]
    conversations = [tokenize_conversation(pair.tokenizer, [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}], i, 1024)
                     for i, t in enumerate(texts)]
    cc = _exact_crosscoder(pair.d_model, (2.0, 0.5))
    conditions = Conditions(cc, [LatentSet("half", np.arange(0, 4 * pair.d_model, 2))])
    config = CausalConfig(crosscoder="-", analysis_dir="-", conversations="-", batch_size=2, k_first=3)  # 3 batches
    clean = score(pair, 1, conditions, conversations, config)

    job = fingerprint({"layer": 1}, cc, conversations)
    path = tmp_path / ".causal.progress.json"
    real_kl, calls = experiment.kl_per_token, []

    def failing_kl(*args):
        calls.append(1)
        if len(calls) > len(conditions.names()) + 1:  # partway through the second batch
            raise KeyboardInterrupt
        return real_kl(*args)

    monkeypatch.setattr(experiment, "kl_per_token", failing_kl)
    with pytest.raises(KeyboardInterrupt):
        score(pair, 1, conditions, conversations, config, progress=ScoringProgress(path, job, every_s=0))
    assert json.loads(path.read_text())["batches_done"] == 1
    calls.clear()
    monkeypatch.setattr(experiment, "kl_per_token", lambda *args: (calls.append(1), real_kl(*args))[1])
    resumed = score(pair, 1, conditions, conversations, config, progress=ScoringProgress(path, job, every_s=0))
    assert len(calls) == 2 * len(conditions.names())  # only the two batches left were scored
    assert dict(resumed.sums) == dict(clean.sums) and dict(resumed.counts) == dict(clean.counts)  # bit for bit
    # Another job (another crosscoder) does not take these sums.
    other = fingerprint({"layer": 1}, _exact_crosscoder(pair.d_model, (1.0, 1.0)), conversations)
    assert other != job and ScoringProgress(path, other).load() is None


def test_a_truth_file_without_what_steering_needs_is_one_line(tmp_path):
    from crossdiff.causal.planted import PlantedSteerConfig, steerable
    from crossdiff.errors import CrossdiffError
    from crossdiff.organism.truth import truth_from_dict

    behaviour = {"name": "x", "patterns": ["a"], "prompts": ["p"], "expect": "e", "contrast_prompts": ["c"]}
    assert [b.name for b in steerable(truth_from_dict({"behaviours": [behaviour], "ordinary_prompts": ["o"]}), "t.json")] == ["x"]
    assert steerable(truth_from_dict({"behaviours": [behaviour]}), "t.json", "anticipation")  # needs no ordinary prompts
    with pytest.raises(CrossdiffError, match="t.json has no 'ordinary_prompts'"):
        steerable(truth_from_dict({"behaviours": [behaviour]}), "t.json", "answer-start")
    for pick, keys in (("anticipation", ("expect", "prompts")), ("attribution", ("expect", "contrast_prompts", "prompts")),
                       ("answer-start", ("expect", "contrast_prompts", "prompts"))):
        for key in keys:
            partial = {k: v for k, v in behaviour.items() if k != key}
            with pytest.raises(CrossdiffError, match=f"behaviour 'x' has no '{key}', which steering needs"):
                steerable(truth_from_dict({"behaviours": [partial], "ordinary_prompts": ["o"]}), "t.json", pick)
    with pytest.raises(CrossdiffError, match="latents must be at least 1"):
        PlantedSteerConfig(truth="t", latents=0)
    with pytest.raises(CrossdiffError, match="pick must be one of anticipation, attribution, answer-start"):
        PlantedSteerConfig(truth="t", pick="contrast")
    with pytest.raises(CrossdiffError, match="how must be one of direction, activation"):
        PlantedSteerConfig(truth="t", how="patch")


def test_anticipation_counts_the_examples_whose_words_come_after_the_latent(tmp_path):
    """A latent anticipates a behaviour when the behaviour's words follow its own token in most
    of its top examples; words before or on the token do not count (brute force on small cases)."""
    from crossdiff.analysis.examples import Example
    from crossdiff.causal.planted import anticipation_share
    from crossdiff.organism.truth import Behaviour

    pirate = Behaviour("pirate", [r"Arr[,!]|matey"])

    def example(tokens: list[str], at: int) -> Example:
        return Example(0, "top", 0, 1.0, "chat", 0, at, 0, at, list(range(len(tokens))), [None] * len(tokens), tokens)

    before = example(["assistant", "\n", "Arr", ",", " matey"], 1)  # fires just before the answer: anticipates
    on_word = example(["Arr", ",", " matey", "!"], 2)  # fires on 'matey', nothing after it: reads it
    after = example(["Arr", "!", " The", " sea"], 3)
    assert anticipation_share([before], pirate) == 1.0
    assert anticipation_share([on_word], pirate) == 0.0 and anticipation_share([after], pirate) == 0.0
    assert anticipation_share([before, on_word, after, before], pirate) == 0.5
    assert anticipation_share([], pirate) == 0.0
    no_tokens = before._replace(tokens=None)
    assert anticipation_share([no_tokens], pirate) == 0.0


def test_the_ceiling_is_the_base_continued_from_the_chat_residual(tiny_model_pairs):
    """ceiling_answers equals a brute-force greedy loop whose base block L outputs the chat's
    block-L output; at the last block only the (base) final norm and head remain."""
    from crossdiff.causal.conversations import end_of_turn_ids
    from crossdiff.causal.planted import ceiling_answers
    from crossdiff.causal.conversations import user_prompt_ids
    from crossdiff.models import decoder_layers

    pair = load_model_pair(*tiny_model_pairs["llama"], dtype="float32")
    prompts, n = ["Write a poem about the sea.", "Hi"], 6
    stop = set(end_of_turn_ids(pair.tokenizer, pair.chat))

    def brute_force(layer: int, prompt: str) -> str:
        chat_residual = lambda x: pair.chat(input_ids=x, output_hidden_states=True).hidden_states[layer + 1]  # noqa: E731
        return greedy_with_block_output(pair, layer, prompt, n, stop, chat_residual)

    for layer in range(len(decoder_layers(pair.base))):
        if layer == len(decoder_layers(pair.base)) - 1:
            continue  # hidden_states[-1] has the final norm applied: not the block's raw output
        assert ceiling_answers(pair, layer, prompts, n) == [brute_force(layer, p) for p in prompts]
    answers = ceiling_answers(pair, 0, prompts, n)
    assert any(answers)  # the tiny models do generate something to compare


def greedy_with_block_output(pair, layer: int, prompt: str, n: int, stop, residual_of) -> str:
    """Brute force: the base's greedy answer, every step recomputed on the whole sequence (no KV
    cache), with block ``layer``'s output replaced by ``residual_of(input_ids)`` [1, T, d]."""
    from crossdiff.causal.conversations import user_prompt_ids
    from crossdiff.models import decoder_layers

    ids = user_prompt_ids(pair.tokenizer, prompt)
    start = len(ids)
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.inference_mode():
            replacement = residual_of(x)
            swap = decoder_layers(pair.base)[layer].register_forward_hook(
                lambda module, args, output: (replacement, *output[1:]) if isinstance(output, tuple) else replacement)
            try:
                token = int(pair.base(input_ids=x).logits[0, -1].argmax())
            finally:
                swap.remove()
        if token in set(stop):
            break
        ids.append(token)
    return pair.tokenizer.decode(ids[start:], skip_special_tokens=True).strip()
