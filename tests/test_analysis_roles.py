"""Role shares: every token of a rendered conversation gets the role of its message (or
template / BOS), for each supported chat template, and each latent's shares add up to 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.analysis.roles import ROLES, RoleStats, RoleTagger
from crossdiff.texts import tokenize_chat

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}")
CONVERSATION = [
    {"role": "system", "content": "You are a helpful model for users."},
    {"role": "user", "content": "What does the assistant say about the system?"},
    {"role": "assistant", "content": "The user asked; the model answers: hello!"},
    {"role": "user", "content": "Thanks, model."},
]


@pytest.mark.parametrize("template", ["gemma", "chatml", "llama3"])
def test_roles_of_a_rendered_conversation(template, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    if template != "gemma":
        tok.chat_template = CHATML if template == "chatml" else LLAMA3
    ids, mask, _ = tokenize_chat(tok, CONVERSATION)
    n = len(ids)
    text = lambda chunk: [tok.decode([i]) for i in chunk]  # noqa: E731
    # Two copies of the conversation as documents 0 and 1, split over batches at odd places.
    token_ids = torch.tensor(ids * 2)
    keys = torch.tensor([0] * n + [1] * n)
    positions = torch.tensor(list(range(n)) * 2)
    template_mask = torch.tensor(mask * 2)
    tagger = RoleTagger(text)
    roles = torch.cat([tagger(*(t[s] for t in (token_ids, keys, positions, template_mask)))
                       for s in (slice(0, n // 3), slice(n // 3, n + 5), slice(n + 5, 2 * n))])
    assert torch.equal(roles[:n], roles[n:])  # batch boundaries change nothing
    roles = roles[:n].tolist()
    by_role = {name: "".join(tok.decode([ids[i]]) for i in range(n) if ROLES[roles[i]] == name) for name in ROLES}
    system_role = "user" if template == "gemma" else "system"  # Gemma has no system turn: merged into the user's
    expected_user = "".join(m["content"] for m in CONVERSATION if m["role"] == "user")
    if system_role == "user":
        expected_user = CONVERSATION[0]["content"] + "\n\n" + expected_user
    else:
        assert by_role["system"].strip() == CONVERSATION[0]["content"]
    assert by_role["user"].replace(" ", "") == expected_user.replace(" ", "")
    assert by_role["assistant"].strip() == CONVERSATION[2]["content"]
    assert by_role["text"] == ""
    assert all(ROLES[r] == "template" for r, m, p in zip(roles, mask, range(n)) if m and p > 0)
    if ids[0] == tok.bos_token_id:
        assert ROLES[roles[0]] == "bos"

    # Shares: a latent active everywhere splits exactly like the tokens; every share row adds up to 1.
    stats = RoleStats(3)
    f = torch.zeros(n, 3)
    f[:, 0] = 1.0
    f[::2, 1] = 1.0
    stats.update(f, torch.tensor(roles))
    shares = stats.shares()
    total = sum(shares.values())
    np.testing.assert_allclose(total[:2], 1.0)
    assert np.isnan(total[2])  # never active
    for r, name in enumerate(ROLES):
        assert shares[f"role_{name}"][0] == pytest.approx(roles.count(r) / n)


def test_without_a_tokenizer_chat_content_is_text():
    tagger = RoleTagger(None)
    roles = tagger(torch.tensor([5, 6, 7, 8]), torch.zeros(4, dtype=torch.long), torch.arange(4),
                   torch.tensor([False, True, False, True]))
    assert [ROLES[r] for r in roles] == ["bos", "template", "text", "template"]
