"""Data-parallel training: N processes with a global batch of B tokens train the crosscoder
that one process with batch B trains.

Launched by ``torchrun`` (NCCL between GPUs, gloo between CPU processes), every rank holds
the whole crosscoder and its own disjoint part of each global batch. Everything that the
loss of docs/method.md 3 takes over the batch is taken over the *global* batch:

* the BatchTopK selection keeps the k*B largest scaled activations of all ranks' tokens
  together (:meth:`DataParallel.batch_topk`), found without gathering any [B, d_sae]
  tensor: the ranks agree on a bound that at least k*B entries reach, each sends only its
  entries above the bound (about 1.25 k*B values in all), and every rank computes the
  same exact cut from them;
* means over tokens are sums of per-rank shares divided by the global B, so summing the
  gradients over ranks (:meth:`DataParallel.sum_gradients`) gives the global gradient,
  and every rank applies the same Adam step to the same weights;
* the dead-latent counters, the threshold's batch minimum, L0 and the logged metrics are
  global (small all-reduces).

A process that is not started by torchrun (no WORLD_SIZE > 1 in its environment) gets no
DataParallel and runs the single-process code unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from crossdiff.errors import CrossdiffError, first_line
from crossdiff.train.sparse_ops import (
    GROUP,
    Selection,
    _entries_reaching,
    _estimate_threshold,
    _one_cpu_thread,
    selection_from_flat,
)

_RETRIES = 3
_joined_here = False  # this module initialised the process group (and leaves it before exit)


def launched_world_size() -> int:
    """Number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def leave_process_group() -> None:
    """Shut down the process group :meth:`DataParallel.from_environment` joined, before the
    process exits: exiting with gloo's threads still running may abort the rank ("terminate
    called without an active exception") or hang it in their teardown, after a finished run."""
    global _joined_here
    if _joined_here and dist.is_initialized():
        dist.destroy_process_group()
    _joined_here = False


class DataParallel:
    """This process's place among the ranks, and the collectives training needs.

    All methods are collective: every rank must call them in the same order.
    """

    def __init__(self, device: torch.device):
        if not dist.is_initialized():
            raise CrossdiffError("DataParallel needs an initialised torch.distributed process group")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        # NCCL moves only GPU tensors; gloo only CPU ones. Scalars and counts travel on the
        # backend's device and come back to the training device.
        if dist.get_backend() != "nccl":
            self._comm_device = torch.device("cpu")
        elif device.type == "cuda" and device.index is not None:
            self._comm_device = device
        else:
            self._comm_device = torch.device("cuda", torch.cuda.current_device())

    @classmethod
    def from_environment(cls, device: torch.device) -> DataParallel | None:
        """Join the process group torchrun describes (None for a single process)."""
        if not dist.is_available():
            if launched_world_size() > 1:
                raise CrossdiffError("this PyTorch build has no torch.distributed: cannot train on several ranks")
            return None
        if not dist.is_initialized():
            if launched_world_size() <= 1:
                return None
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
            global _joined_here
            _joined_here = True
        if dist.get_world_size() == 1:
            return None
        return cls(device)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and the final crosscoder."""
        return self.rank == 0

    # ------------------------------------------------------------------ reductions
    @contextlib.contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        """A collective that fails (gloo and NCCL raise RuntimeError when a peer is killed or its
        connection drops) stops this rank with one line instead of a traceback per rank; torchrun
        then stops the others, and the same command resumes from the last checkpoint."""
        try:
            yield
        except RuntimeError as err:
            reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(err)).split(". ")[0]  # gloo prefixes its source file
            raise CrossdiffError(f"rank {self.rank} of {self.world_size}: {name} failed ({reason}): a rank of this "
                                 "torchrun job stopped or lost its connection, so every rank stops; rerun the same "
                                 "command to resume from the last checkpoint") from None

    def _reduce(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        """All-reduce ``tensor`` in place (through the backend's device if it differs)."""
        if tensor.device == self._comm_device:
            with self._collective("all_reduce"):
                dist.all_reduce(tensor, op=op)
            return tensor
        moved = tensor.to(self._comm_device)
        with self._collective("all_reduce"):
            dist.all_reduce(moved, op=op)
        tensor.copy_(moved)
        return tensor

    def sum_(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def min_(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, dist.ReduceOp.MIN)

    def any_(self, mask: Tensor) -> Tensor:
        """Logical OR over ranks of a bool tensor (in place)."""
        as_int = mask.to(torch.uint8)
        self._reduce(as_int, dist.ReduceOp.MAX)
        mask.copy_(as_int.bool())
        return mask

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over ranks: the losses are per-rank shares of the
        global mean, so the sum is the gradient of the global batch."""
        for p in parameters:
            if p.grad is None:  # every rank must join every all-reduce
                p.grad = torch.zeros_like(p)
            self.sum_(p.grad)

    def broadcast_(self, tensor: Tensor) -> None:
        """Rank 0's value of ``tensor`` on every rank (in place)."""
        moved = tensor if tensor.device == self._comm_device else tensor.to(self._comm_device)
        with self._collective("broadcast"):
            dist.broadcast(moved, src=0)
        if moved is not tensor:
            tensor.copy_(moved)

    def barrier(self) -> None:
        with self._collective("barrier"):
            dist.barrier()

    def global_batch_size(self, local: int | None) -> int | None:
        """Tokens in this step's global batch, or None if some rank has no batch left (or an
        empty one: a last global batch with fewer tokens than ranks); then every rank stops,
        so none waits forever in a collective."""
        counts = torch.tensor([local or 0, int(not local)], dtype=torch.int64)
        self.sum_(counts)
        return None if int(counts[1]) > 0 else int(counts[0])

    def gather_rows(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same trailing shape, any number of rows), in rank order."""
        sizes = torch.zeros(self.world_size, dtype=torch.int64)
        sizes[self.rank] = tensor.shape[0]
        self.sum_(sizes)
        longest = int(sizes.max())
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=self._comm_device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        with self._collective("all_gather"):
            dist.all_gather(parts, padded)
        return [part[: int(n)].to(tensor.device) for part, n in zip(parts, sizes)]

    # ------------------------------------------------------------------ global batch top-k
    @torch.no_grad()
    def batch_topk(self, pre: Tensor, code_norm: Tensor, n_keep: int, global_batch: int) -> Selection:
        """This rank's part of the ``n_keep`` largest ``relu(pre) * code_norm`` entries of
        the global batch (pre [B_local, D] on each rank).

        Exactly the entries a top-k over the concatenated [global_batch, D] tensor keeps
        (ties at the cut are given to the lowest ranks, rows in order). ``code_norm`` must
        be the same positive vector on every rank.
        """
        B, D = pre.shape
        if n_keep >= global_batch * D:
            return selection_from_flat(torch.arange(B * D, device=pre.device), B, D)
        flat, scaled = self._candidates(pre, code_norm, n_keep, global_batch)
        every = self.gather_rows(scaled)
        cut = torch.cat(every).topk(n_keep, sorted=False).values.min()
        above = sum(int((v > cut).sum()) for v in every)
        ties = [int((v == cut).sum()) for v in every]
        ties_here = min(max(n_keep - above - sum(ties[: self.rank]), 0), ties[self.rank])
        keep = scaled > cut
        if ties_here:
            tied = (scaled == cut).nonzero().squeeze(1)[:ties_here]
            keep[tied] = True
        return selection_from_flat(flat[keep], B, D)

    def _candidates(self, pre: Tensor, code_norm: Tensor, n_keep: int, global_batch: int) -> tuple[Tensor, Tensor]:
        """Flat indices and scaled values of this rank's entries that may be in the global
        top ``n_keep``: those reaching a bound that at least ``n_keep`` entries of all ranks
        reach (so the global cut is at or above it), or else this rank's own top ``n_keep``
        (which holds every entry of the global top on this rank)."""
        B, D = pre.shape
        group = math.gcd(B, GROUP)
        group_max = pre.view(B // group, group, D).amax(dim=1)
        with _one_cpu_thread():
            # Each rank aims its estimate at its share of the kept entries; the smallest
            # estimate is a bound all ranks share and that about OVERSHOOT * n_keep reach.
            estimate = _estimate_threshold(group_max, code_norm, n_keep * group / global_batch)
            bound = torch.tensor([float(estimate) if estimate is not None else 0.0], dtype=torch.float32)
            self.min_(bound)
            threshold = bound.to(pre.device, code_norm.dtype)[0]
            for _ in range(_RETRIES if float(bound) > 0 else 0):
                flat, scaled = _entries_reaching(pre, group_max, code_norm, threshold)
                reaching = scaled >= threshold
                count = torch.tensor([int(reaching.sum())], dtype=torch.int64)
                self.sum_(count)
                if int(count) >= n_keep:
                    return flat[reaching], scaled[reaching]
                threshold = threshold / 4
        scaled = (torch.relu(pre) * code_norm).view(-1)
        top = scaled.topk(min(n_keep, B * D), sorted=False)
        return top.indices, top.values


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of n items; the parts of all ranks tile 0..n."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def split_batches(batches: Iterable[Tensor], rank: int, world_size: int) -> Iterator[Tensor]:
    """Each global batch's rows of this rank (for sources that produce whole global batches,
    such as :class:`crossdiff.synthetic.SyntheticPair`; the cache loader reads only its own
    part instead, ``ShuffledPairLoader(rank=..., world_size=...)``)."""
    for batch in batches:
        x = batch.acts if hasattr(batch, "acts") else batch
        yield x[rank_slice(x.shape[0], rank, world_size)]
