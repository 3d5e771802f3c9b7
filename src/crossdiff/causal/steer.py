"""`crossdiff steer`: generation with latent directions added to the residual stream (placeholder CLI until built)."""

from __future__ import annotations

import argparse


def add_steer_cli(subparsers: argparse._SubParsersAction) -> None:
    return None
