"""Run a causal LM's upper half from an edited residual stream after block L.

The model's own ``forward`` does the work, so everything a model does after block L is
exactly what it always does: rotary embeddings from position ids, the (sliding-window)
attention masks built from ``attention_mask``, the remaining blocks, the final norm, the
LM head and any output step such as Gemma 2's final logit soft-capping. Only two things
change, for the duration of one call:

* blocks 0..L-1 are swapped for pass-throughs and block L for a module that returns the
  given residual, so the lower half costs nothing (its output was computed once, by
  :func:`crossdiff.models.residual_after_block`, and is reused for every condition);
* optionally the LM head sees only the positions that are scored, so the logits of a
  large vocabulary are never built for positions nobody reads. Everything after the LM
  head (soft-capping) is elementwise, so selecting rows before it changes nothing.

The list of blocks keeps its length and order (Gemma 2 picks a block's attention mask
by its index), and the stand-ins forward attribute reads to the block they replace.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from crossdiff.errors import CrossdiffError
from crossdiff.models import _version_tuple, decoder_layers, residual_after_block


def _blocks_return_tuples() -> bool:
    # transformers 4.x decoder blocks return (hidden_states, ...); 5.x return the tensor.
    import transformers  # deferred: transformers takes seconds to import; this module needs it only for this check

    return _version_tuple(transformers.__version__) < (5, 0)


class _StandIn(nn.Module):
    """Takes a decoder block's place: returns its input (``value=None``) or a fixed tensor."""

    def __init__(self, block: nn.Module, value: Tensor | None, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: no double registration
        object.__setattr__(self, "_value", value)
        self._as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states if self._value is None else self._value
        return (out,) if self._as_tuple else out

    def __getattr__(self, name: str) -> Any:  # attention_type, layer_idx, ... of the real block
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class _SelectRows(nn.Module):
    """Takes the LM head's place: applies it to the rows of ``mask`` only ([N, V] out)."""

    def __init__(self, head: nn.Module, mask: Tensor):
        super().__init__()
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_mask", mask)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.shape[:2] != self._mask.shape:
            raise RuntimeError(f"LM head input {tuple(hidden_states.shape)} does not match the position mask {tuple(self._mask.shape)}")
        return self._head(hidden_states[self._mask])


class SplitModel:
    """One causal LM cut after decoder block ``layer``: ``lower`` gives the residual there,
    ``upper`` continues the model's own forward from any residual of that shape."""

    def __init__(self, model: nn.Module, layer: int):
        self.model = model
        self.blocks = decoder_layers(model)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(self.blocks):
            raise CrossdiffError(f"layer {layer!r} out of range: the model has {len(self.blocks)} decoder blocks")
        self.layer = layer
        self._head_name = _output_head_name(model)
        self._as_tuple = _blocks_return_tuples()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def lower(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Residual stream [B, T, d] after block ``layer`` (right-padded inputs)."""
        return residual_after_block(self.model, self.layer, input_ids, attention_mask)

    def upper(self, residual: Tensor, input_ids: Tensor, attention_mask: Tensor, positions: Tensor | None = None, *,
              grad: bool = False) -> Tensor:
        """Logits of the model continued from ``residual`` [B, T, d] after block ``layer``.

        Returns [B, T, V], or [N, V] for the N positions where the bool mask ``positions``
        [B, T] is True (row-major order, like ``logits[positions]``). ``grad=True`` keeps the
        graph from ``residual`` to the logits (attribution); otherwise no graph is built.
        """
        with torch.inference_mode(mode=not grad):
            return self._upper(residual, input_ids, attention_mask, positions)

    def _upper(self, residual: Tensor, input_ids: Tensor, attention_mask: Tensor, positions: Tensor | None) -> Tensor:
        if residual.shape[:2] != input_ids.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match input_ids {tuple(input_ids.shape)}")
        device = self.device
        value = residual.to(device=device, dtype=self.dtype)
        positions = None if positions is None else positions.to(device=device, dtype=torch.bool)
        select_in_head = positions is not None and self._head_name is not None
        with self._swapped(value, positions if select_in_head else None):
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        if positions is not None and not select_in_head:  # no LM head attribute to swap: select afterwards
            logits = logits[positions]
        return logits

    @contextmanager
    def _swapped(self, value: Tensor, positions: Tensor | None) -> Iterator[None]:
        originals = [self.blocks[i] for i in range(self.layer + 1)]
        head = getattr(self.model, self._head_name) if positions is not None else None
        try:
            for i, block in enumerate(originals):
                self.blocks[i] = _StandIn(block, value if i == self.layer else None, self._as_tuple)
            if head is not None:
                setattr(self.model, self._head_name, _SelectRows(head, positions))
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
            if head is not None:
                setattr(self.model, self._head_name, head)


def _output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, child in model.named_children():
        if child is head:
            return name
    return None
