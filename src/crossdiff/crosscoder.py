"""The crosscoder: one joint sparse dictionary over the activations of several models.

Shapes follow the ecosystem's convention (docs/method.md 2, docs/architecture.md):

    W_enc [n_models, d_in, d_sae]   b_enc [d_sae]
    W_dec [d_sae, n_models, d_in]   b_dec [n_models, d_in]

Model 0 is the base model, model 1 the chat model. The encoder is joint (no b_dec
subtraction), the decoder is per model, and decoder norms are never constrained: the
relative norm of a latent's per-model decoder vectors is the diffing signal.

Two kinds of activation appear everywhere, and mixing them up silently breaks results:

* raw activations ``f`` (what :meth:`CrossCoder.encode` returns) are used for decoding,
  Latent Scaling and patching;
* scaled activations ``f~ = f * code_norm`` (:meth:`CrossCoder.scale`) are used for the
  sparsity penalty, BatchTopK selection and threshold, and every latent statistic.

A dedicated feature crosscoder (DFC, ``dfc_partition``; crossdiff.partition) is the same
crosscoder with base-exclusive and chat-exclusive index ranges whose other model's encoder
columns and decoder rows are zero and stay zero.

The crosscoder works in its own input space. If the activations were normalised for
training, ``input_scale`` holds the per-model factor: ``normalize`` maps model
activations into crosscoder space and ``denormalize`` maps reconstructions back.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from crossdiff.config import from_dict, to_dict
from crossdiff.errors import CrossdiffError, first_line
from crossdiff.files import (
    ensure_output_folder,
    read_error,
    sha256_file,
    sha256_mismatch,
    share_like_umask,
    write_atomic,
    write_text_atomic,
)
from crossdiff.importers import read_dictionary_learning
from crossdiff.partition import allowed_latents, check_partition, largest_forbidden, zero_forbidden

Activation = Literal["relu", "batchtopk", "topk"]
CodeNormalization = Literal["crosscoder", "sae", "mixed", "none"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "crossdiff.crosscoder"
WEIGHTS_SHA_KEY = "weights_sha256"  # in config.json, beside the config: the sha256 of model.safetensors

# Default per-latent decoder norm at init (docs/method.md 2): small for L1, unit for top-k.
DEFAULT_NORM_INIT_SCALE = {"relu": 0.005, "batchtopk": 1.0, "topk": 1.0}


@dataclass
class CrossCoderConfig:
    """Everything needed to rebuild a crosscoder; saved as the checkpoint's config.json."""

    d_in: int
    d_sae: int
    n_models: int = 2
    activation: Activation = "batchtopk"
    k: int | None = None
    """Active latents per token: exact for `topk`, on average over a batch for `batchtopk`."""
    norm_init_scale: float | None = None
    """Norm of every per-model decoder vector at init; None picks the paper's default."""
    code_normalization: CodeNormalization = "crosscoder"
    """How decoder norms weight activations: `crosscoder` sum of per-model norms (paper),
    `sae` norm of the concatenated decoder vector, `mixed` alpha_sae*sae + alpha_cc*crosscoder,
    `none` no weighting."""
    code_normalization_alpha_sae: float = 1.0
    code_normalization_alpha_cc: float = 0.1
    threshold: float = -1.0
    """BatchTopK inference threshold in scaled units; negative until training sets it."""
    input_scale: list[float] | None = None
    """Per-model factor that maps model activations into crosscoder space (None = 1)."""
    input_shift: list[list[float]] | None = None
    """Per-model vector [n_models][d_in] subtracted before ``input_scale`` (None = 0); set by
    importing a dictionary_learning crosscoder trained with its activation normaliser."""
    denormalize_epsilon: float = 0.0
    """Added to ``input_scale`` when mapping reconstructions back (dictionary_learning adds 1e-8)."""
    model_names: list[str] | None = None
    """Hub ids or paths of the models, base first."""
    layer: int | None = None
    """Decoder block whose output residual stream the crosscoder reads."""
    dfc_partition: list[int] | None = None
    """Dedicated feature crosscoder: [base-exclusive, chat-exclusive] latent counts; latents
    [0, a) are base-only, [a, a + b) chat-only, the rest shared (crossdiff.partition). None =
    an ordinary crosscoder."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Provenance: training config, importer source, anything a reader may want."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise CrossdiffError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.n_models < 2:
            raise CrossdiffError(f"a crosscoder needs n_models >= 2, got {self.n_models}")
        if self.activation not in DEFAULT_NORM_INIT_SCALE:
            raise CrossdiffError(f"activation must be one of relu, batchtopk, topk; got {self.activation!r}")
        if self.activation != "relu":
            if self.k is None or self.k <= 0:
                raise CrossdiffError(f"activation '{self.activation}' needs a positive k, got k={self.k}")
            if self.k > self.d_sae:
                raise CrossdiffError(f"k={self.k} exceeds the dictionary size d_sae={self.d_sae}")
        if self.code_normalization not in ("crosscoder", "sae", "mixed", "none"):
            raise CrossdiffError(
                f"code_normalization must be crosscoder, sae, mixed or none; got {self.code_normalization!r}"
            )
        if self.input_scale is not None and len(self.input_scale) != self.n_models:
            raise CrossdiffError(f"input_scale has {len(self.input_scale)} entries for {self.n_models} models")
        if self.input_shift is not None and (
            len(self.input_shift) != self.n_models or any(len(row) != self.d_in for row in self.input_shift)
        ):
            raise CrossdiffError(f"input_shift must be {self.n_models} lists of {self.d_in} numbers")
        if self.dfc_partition is not None:
            check_partition(self.dfc_partition, self.d_sae, self.n_models)
        if self.norm_init_scale is None:
            self.norm_init_scale = DEFAULT_NORM_INIT_SCALE[self.activation]


class CrossCoder(nn.Module):
    """A crosscoder with L1 (`relu`), BatchTopK (`batchtopk`) or per-token TopK (`topk`) sparsity."""

    def __init__(self, config: CrossCoderConfig, *, seed: int | None = None):
        super().__init__()
        self.config = config
        n, d, D = config.n_models, config.d_in, config.d_sae
        self.W_enc = nn.Parameter(torch.empty(n, d, D))
        self.b_enc = nn.Parameter(torch.zeros(D))
        self.W_dec = nn.Parameter(torch.empty(D, n, d))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        # Buffers travel with state_dict and .to(device), and are saved beside the weights.
        self.register_buffer("threshold", torch.tensor(float(config.threshold)))
        scale = config.input_scale or [1.0] * n
        self.register_buffer("input_scale", torch.tensor(scale, dtype=torch.float32))
        # Not in the state dict (config.json holds it), but moved by .to() like the weights.
        shift = torch.tensor(config.input_shift, dtype=torch.float32) if config.input_shift is not None else None
        self.register_buffer("input_shift", shift, persistent=False)
        # DFC: [d_sae, 2] bool, False in the forbidden blocks (config.json holds the partition).
        allowed = allowed_latents(config.dfc_partition, D) if config.dfc_partition is not None else None
        self.register_buffer("partition_allowed", allowed, persistent=False)
        self.reset_parameters(seed)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """The paper's init: one random draw shared by all models, W_dec = W_enc^T, each
        latent's per-model vector at norm `norm_init_scale`, zero biases."""
        n, d, D = self.config.n_models, self.config.d_in, self.config.d_sae
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # kaiming-uniform bound for a [d, D] weight (fan_in = D in torch's convention); only the
        # direction survives the renormalisation below, so the bound itself is immaterial.
        bound = math.sqrt(6.0 / D)
        shared = (torch.rand(d, D, generator=generator) * 2 - 1) * bound
        shared = shared / shared.norm(dim=0, keepdim=True) * self.config.norm_init_scale
        self.W_enc.copy_(shared.unsqueeze(0).expand(n, d, D))
        self.W_dec.copy_(self.W_enc.permute(2, 0, 1))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.partition_allowed is not None:  # DFC: the forbidden blocks start at zero
            zero_forbidden(self.W_enc, self.W_dec, self.partition_allowed)

    @torch.no_grad()
    def mask_forbidden_gradients(self) -> None:
        """DFC: zero the gradients of the forbidden blocks (before clipping and Adam, as
        dfc_learning's gradient hooks do), so every loss term leaves them, and Adam's
        moments, at exactly zero. Nothing for an ordinary crosscoder."""
        if self.partition_allowed is not None and self.W_enc.grad is not None and self.W_dec.grad is not None:
            zero_forbidden(self.W_enc.grad, self.W_dec.grad, self.partition_allowed)

    # ------------------------------------------------------------------ encoder
    def pre_activations(self, x: Tensor) -> Tensor:
        """Joint encoder pre-activations: [B, n_models, d_in] -> [B, d_sae]."""
        self._check_input(x)
        n, d, D = self.W_enc.shape
        return x.reshape(x.shape[0], n * d) @ self.W_enc.reshape(n * d, D) + self.b_enc

    def code_norm(self) -> Tensor:
        """Per-latent weight [d_sae] that turns raw activations into scaled ones."""
        mode = self.config.code_normalization
        if mode == "none":
            return torch.ones(self.config.d_sae, device=self.W_dec.device, dtype=self.W_dec.dtype)
        per_model = self.W_dec.norm(dim=-1)  # [D, n]
        if mode == "crosscoder":
            return per_model.sum(dim=-1)
        concat = per_model.square().sum(dim=-1).sqrt()  # norm of the concatenated decoder vector
        if mode == "sae":
            return concat
        return self.config.code_normalization_alpha_sae * concat + self.config.code_normalization_alpha_cc * per_model.sum(-1)

    def scale(self, f: Tensor) -> Tensor:
        """Scaled activations f~ = f * code_norm (statistics, selection, sparsity penalty)."""
        return f * self.code_norm()

    def encode(self, x: Tensor, *, use_threshold: bool = True) -> Tensor:
        """Raw latent activations [B, d_sae] after the sparsity nonlinearity.

        For `batchtopk`, ``use_threshold=True`` (inference) keeps latents whose scaled
        activation exceeds the learned threshold; ``False`` (training), or a threshold not
        yet learned, keeps the k*B largest scaled activations of the whole batch.
        """
        f = torch.relu(self.pre_activations(x))
        activation = self.config.activation
        if activation == "relu":
            return f
        scaled = self.scale(f)
        if activation == "topk":
            return _keep_topk(f, scaled, self.config.k, dim=-1)
        if use_threshold and self.threshold >= 0:
            return f * (scaled > self.threshold)
        return _keep_topk(f.reshape(-1), scaled.reshape(-1), self.config.k * x.shape[0], dim=-1).reshape(f.shape)

    def get_activations(self, x: Tensor, *, use_threshold: bool = True) -> Tensor:
        """Scaled inference activations f~ [B, d_sae], the units of every latent statistic."""
        return self.scale(self.encode(x, use_threshold=use_threshold))

    # ------------------------------------------------------------------ decoder
    def decode(self, f: Tensor, *, add_bias: bool = True) -> Tensor:
        """Reconstruction [B, n_models, d_in] from raw activations [B, d_sae]."""
        D, n, d = self.W_dec.shape
        x_hat = (f @ self.W_dec.reshape(D, n * d)).reshape(f.shape[0], n, d)
        return x_hat + self.b_dec if add_bias else x_hat

    def forward(self, x: Tensor, *, use_threshold: bool = True) -> Tensor:
        return self.decode(self.encode(x, use_threshold=use_threshold))

    # ------------------------------------------------------------------ input space
    def normalize(self, x: Tensor) -> Tensor:
        """Model activations [B, n_models, d_in] -> crosscoder space: (x - input_shift) * input_scale."""
        if self.input_shift is not None:
            x = x - self.input_shift.to(x.dtype)
        return x * self.input_scale.to(x.dtype)[:, None]

    def denormalize(self, x: Tensor) -> Tensor:
        """Crosscoder-space reconstructions -> model activation space."""
        x = x / (self.input_scale.to(x.dtype)[:, None] + self.config.denormalize_epsilon)  # + 0.0 changes no bit
        if self.input_shift is not None:
            x = x + self.input_shift.to(x.dtype)
        return x

    # ------------------------------------------------------------------ decoder geometry
    def decoder_norms(self) -> Tensor:
        """Per-model decoder norms [d_sae, n_models]."""
        return self.W_dec.norm(dim=-1)

    def relative_decoder_norm(self, base: int = 0, chat: int = 1) -> Tensor:
        """Dnorm in the paper's orientation: 1 = only in `chat`, 0 = only in `base`, 0.5 = equal."""
        norms = self.decoder_norms()
        return relative_norm(norms[:, base], norms[:, chat])

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into ``folder``.

        Each file is replaced atomically, and config.json records the weights' sha256,
        which :meth:`from_pretrained` checks: a damaged file is refused, never used.
        """
        folder = ensure_output_folder(folder, "crosscoder folder")
        self.config.threshold = float(self.threshold)
        self.config.input_scale = [float(v) for v in self.input_scale]
        if self.input_shift is not None:
            self.config.input_shift = [[float(v) for v in row] for row in self.input_shift.float()]
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        weights = folder / WEIGHTS_NAME

        def write_weights(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            share_like_umask(tmp)  # safetensors creates files readable by their owner only

        write_atomic(weights, write_weights)
        payload = {"format": FORMAT_NAME, **to_dict(self.config), WEIGHTS_SHA_KEY: sha256_file(weights)}
        write_text_atomic(folder / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
    ) -> "CrossCoder":
        """Load a crossdiff checkpoint or a dictionary_learning crosscoder (the paper's
        published ones), from a local folder or a Hugging Face hub repository id."""
        folder = Path(name_or_path)
        if not folder.exists():
            folder = _download_from_hub(str(name_or_path), revision)
        weights_file = None
        if folder.is_file():  # a weights file: the dictionary_learning .pt, or a crossdiff model.safetensors
            weights_file, folder = folder, folder.parent
        config_path = folder / CONFIG_NAME
        config_data = _read_config(config_path) if config_path.is_file() else {}
        if config_data.get("format") == FORMAT_NAME:
            model = cls._load_native(folder, config_data)
        else:
            if not config_path.is_file() and weights_file is None and _has_native_weights(folder / WEIGHTS_NAME):
                raise CrossdiffError(f"{config_path} is missing: a crossdiff crosscoder needs its config beside {WEIGHTS_NAME}")
            imported = read_dictionary_learning(weights_file or folder, config_data)
            model = cls(CrossCoderConfig(**imported.config))
            model.load_checked_state_dict(imported.tensors, source=imported.source)
        return model.to(device=device, dtype=dtype)

    @classmethod
    def _load_native(cls, folder: Path, config_data: dict[str, Any]) -> "CrossCoder":
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file():
            raise CrossdiffError(f"checkpoint {folder} is missing {WEIGHTS_NAME}")
        expected_sha = config_data.get(WEIGHTS_SHA_KEY)
        config_data = {k: v for k, v in config_data.items() if k not in ("format", WEIGHTS_SHA_KEY)}
        config = from_dict(CrossCoderConfig, config_data, source=str(folder / CONFIG_NAME))
        try:
            if expected_sha is not None and sha256_file(weights_path) != expected_sha:
                raise CrossdiffError(sha256_mismatch(str(weights_path), CONFIG_NAME))
            state = load_file(str(weights_path))
        except OSError as err:
            raise read_error(weights_path, err) from None
        except CrossdiffError:
            raise
        except Exception as err:  # safetensors raises several types for truncated files
            raise CrossdiffError(f"cannot read {weights_path}: {first_line(err)}") from None
        model = cls(config)
        model.load_checked_state_dict(state, source=str(weights_path))
        return model

    def load_checked_state_dict(self, state: dict[str, Tensor], source: str) -> None:
        """load_state_dict with one-line errors naming the missing or mis-shaped tensor."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CrossdiffError(f"{source} lacks tensors {missing}")
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise CrossdiffError(f"{source} has unexpected tensors {unexpected}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CrossdiffError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}"
                )
        self.check_partition_intact(state["W_enc"], state["W_dec"], source)
        self.load_state_dict(state)

    def check_partition_intact(self, W_enc: Tensor | None = None, W_dec: Tensor | None = None, source: str = "crosscoder") -> None:
        """DFC: one-line error unless the forbidden blocks of W_enc and W_dec (default: this
        crosscoder's) are exactly zero. Nothing for an ordinary crosscoder."""
        if self.partition_allowed is None:
            return
        W_enc = self.W_enc if W_enc is None else W_enc
        W_dec = self.W_dec if W_dec is None else W_dec
        worst = largest_forbidden(W_enc, W_dec, self.partition_allowed.to(W_enc.device))
        if worst != 0:
            raise CrossdiffError(
                f"{source}: the DFC partition {self.config.dfc_partition} does not fit these weights: its forbidden "
                f"encoder/decoder blocks hold values up to {worst:.3g} instead of zeros"
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload crosscoder with crossdiff",
        api: Any = None,
    ) -> str:
        """Publish the checkpoint folder (with a model card) to the Hugging Face hub."""
        if api is None:
            from huggingface_hub import HfApi  # deferred: huggingface_hub's API takes about 0.3 s to import; only publishing needs it

            api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            (Path(tmp) / "README.md").write_text(self.model_card())
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return repo_id

    def model_card(self) -> str:
        c = self.config
        models = " / ".join(c.model_names or ["(unknown)"])
        return (
            "---\nlibrary_name: crossdiff\ntags: [crosscoder, model-diffing, interpretability]\n---\n"
            f"# Crosscoder ({c.activation}, d_in={c.d_in}, d_sae={c.d_sae})\n\n"
            f"Models (base first): {models}; layer {c.layer}.\n"
            f"Sparsity: {c.activation}" + (f", k={c.k}" if c.k else "") + f"; code normalisation: {c.code_normalization}.\n"
            + (f"Dedicated feature crosscoder: latents [0, {c.dfc_partition[0]}) base-only, "
               f"[{c.dfc_partition[0]}, {sum(c.dfc_partition)}) chat-only, the rest shared.\n" if c.dfc_partition else "")
            + "\n"
            "Load with `crossdiff.CrossCoder.from_pretrained(repo_id)`.\n"
        )

    # ------------------------------------------------------------------ helpers
    def _check_input(self, x: Tensor) -> None:
        expected = (self.config.n_models, self.config.d_in)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise CrossdiffError(
                f"crosscoder input must have shape [batch, {expected[0]}, {expected[1]}], got {list(x.shape)}"
            )

    def extra_repr(self) -> str:
        c = self.config
        dfc = f", dfc_partition={c.dfc_partition}" if c.dfc_partition is not None else ""
        return f"n_models={c.n_models}, d_in={c.d_in}, d_sae={c.d_sae}, activation={c.activation}, k={c.k}{dfc}"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise read_error(path, err) from None
    except ValueError as err:
        raise CrossdiffError(f"{path} is damaged (not valid JSON: {first_line(err)})") from None
    if not isinstance(data, dict):
        raise CrossdiffError(f"{path} is damaged (not a JSON object)")
    return data


def _has_native_weights(path: Path) -> bool:
    """Whether ``path`` is a safetensors file holding crossdiff's tensor names."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return "W_enc" in f.keys()
    except Exception:  # unreadable: the importer will say so
        return False


def relative_norm(norm_base: Tensor, norm_chat: Tensor) -> Tensor:
    """Dnorm = 0.5 * ((|d_chat| - |d_base|) / max(|d_chat|, |d_base|) + 1): 1 = chat-only,
    0 = base-only, 0.5 = equal; NaN where both decoder vectors are zero (no direction)."""
    return 0.5 * ((norm_chat - norm_base) / torch.maximum(norm_base, norm_chat) + 1)


def _keep_topk(values: Tensor, scores: Tensor, k: int, dim: int) -> Tensor:
    """Zero all of ``values`` except where ``scores`` is among the k largest along ``dim``."""
    k = min(k, scores.shape[dim])
    idx = scores.topk(k, dim=dim, sorted=False).indices
    return torch.zeros_like(values).scatter(dim, idx, values.gather(dim, idx))


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download  # deferred: as in push_to_hub; only a hub download needs it

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.pt", "*.pth", "*.bin"],
            )
        )
    except Exception as err:  # offline, missing repo, auth: all one line for the user
        raise CrossdiffError(f"'{repo_id}' is neither a local folder nor a loadable hub repository ({type(err).__name__}: {err})") from None

