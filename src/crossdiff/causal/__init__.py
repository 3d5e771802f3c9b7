"""Causal evidence for crosscoder latents: KL patching (docs/method.md 6) and steering.

``crossdiff causal`` puts chosen latents' chat-minus-base decoder contribution into the
base model's residual stream, runs the rest of the chat model, and measures how much of
the base-to-chat KL on assistant tokens that closes. ``crossdiff steer`` adds latent
directions to a model's residual stream while it generates.
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "SplitModel": "crossdiff.causal.upper",
})
