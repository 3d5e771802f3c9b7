"""Who is speaking at each token, and how each latent's activity splits over the roles.

A concept that fires on assistant text reads differently from one on user text, so every
latent gets its activity split over ROLES (shares that add up to 1):

``bos``        position 0 of a document (the BOS token);
``template``   chat-template tokens (``<start_of_turn>``, role names, ...), BOS excluded;
``user``, ``assistant``, ``system``   message content of that role;
``text``       content of plain-text documents, and chat content whose role is unknown
               (no tokenizer to read the template with).

The cache stores the template flag of every token, not the role, so the role is read back
from the template: each run of template tokens before a message names its role
(``<start_of_turn>model``, ``<|im_start|>assistant``,
``<|start_header_id|>user<|end_header_id|>``); the message content that follows, up to the
next run, has that role. The last role word of a run counts (a run often closes one turn
and opens the next). Runs are read once per distinct token sequence.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch
from torch import Tensor

ROLES = ("bos", "template", "user", "assistant", "system", "text")
BOS, TEMPLATE, USER, ASSISTANT, SYSTEM, TEXT = range(len(ROLES))
_ROLE_WORDS = {"user": USER, "human": USER, "assistant": ASSISTANT, "model": ASSISTANT, "gpt": ASSISTANT,
               "system": SYSTEM}
_ROLE_PATTERN = re.compile(r"(?<![A-Za-z])(" + "|".join(_ROLE_WORDS) + r")(?![A-Za-z])", re.I)


class RoleTagger:
    """Role code (index into ROLES) of every token of a stream of batches in stored order.

    ``token_text(ids) -> texts`` decodes token ids (None: chat content is ``text``). State
    carries over between batches, since a document may continue in the next batch.
    """

    def __init__(self, token_text: Callable[[list[int]], list[str]] | None):
        self.token_text = token_text
        self._run_roles: dict[tuple[int, ...], int] = {}
        self._last_key: int | None = None
        self._last_role = -1

    def __call__(self, token_ids: Tensor, doc_keys: Tensor, positions: Tensor, template: Tensor) -> Tensor:
        ids = token_ids.cpu().numpy()
        keys = doc_keys.cpu().numpy()
        tmpl = template.cpu().numpy().astype(bool)
        bos = positions.cpu().numpy() == 0
        n = len(ids)
        roles = np.full(n, TEXT, dtype=np.int64)
        if n == 0:
            return torch.from_numpy(roles)
        index = np.arange(n)
        new_doc = np.r_[True, keys[1:] != keys[:-1]]
        run = tmpl & ~bos
        if self.token_text is not None and run.any():
            # A run starts at a template token whose predecessor is not one (or is in another document).
            starts = np.nonzero(run & (new_doc | ~np.r_[False, run[:-1]]))[0]
            ends = np.nonzero(run & (np.r_[new_doc[1:], True] | ~np.r_[run[1:], False]))[0]
            setter = np.full(n, -1, dtype=np.int64)
            for start, end in zip(starts, ends):
                setter[end] = self._run_role(tuple(ids[start:end + 1].tolist()))
            last = np.maximum.accumulate(np.where(setter >= 0, index, -1))
            doc_start = np.maximum.accumulate(np.where(new_doc, index, 0))
            role = np.where(last >= doc_start, setter[np.maximum(last, 0)], -1)
            continues = self._last_key is not None and keys[0] == self._last_key
            if continues:  # the first document started in an earlier batch
                role = np.where((doc_start == 0) & (role < 0), self._last_role, role)
            content = ~tmpl & ~bos
            roles[content & (role >= 0)] = role[content & (role >= 0)]
            self._last_role = int(role[-1])
        roles[run] = TEMPLATE
        roles[bos] = BOS
        self._last_key = int(keys[-1])
        return torch.from_numpy(roles).to(token_ids.device)

    def _run_role(self, run: tuple[int, ...]) -> int:
        if run not in self._run_roles:
            words = _ROLE_PATTERN.findall("".join(self.token_text(list(run))))
            self._run_roles[run] = _ROLE_WORDS[words[-1].lower()] if words else -1
        return self._run_roles[run]


class RoleStats:
    """Per latent, active tokens per role; :meth:`shares` divides by the latent's active tokens."""

    def __init__(self, n_latents: int, *, device: torch.device | str = "cpu", active_threshold: float = 1e-3):
        self.counts = torch.zeros(n_latents, len(ROLES), dtype=torch.int64, device=device)
        self.threshold = active_threshold

    @torch.no_grad()
    def update(self, f_scaled: Tensor, roles: Tensor) -> None:
        active = (f_scaled > self.threshold).to(f_scaled.dtype)
        one_hot = torch.nn.functional.one_hot(roles.to(f_scaled.device).long(), len(ROLES)).to(f_scaled.dtype)
        self.counts += (active.T @ one_hot).round().to(torch.int64)

    def shares(self) -> dict[str, np.ndarray]:
        counts = self.counts.cpu().numpy()
        total = counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = np.where(total > 0, counts / total, np.nan)
        return {f"role_{name}": shares[:, r] for r, name in enumerate(ROLES)}
