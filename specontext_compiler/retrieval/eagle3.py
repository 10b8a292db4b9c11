"""The paper's configuration: an EAGLE-3 draft head as the retrieval head.

An EAGLE-3 head (the format of the public heads for Llama-3.1-8B, Qwen3-8B, DeepSeek-R1-Distill-Llama-8B)
is a safetensors checkpoint with ``fc`` (3 target hidden states -> hidden), one decoder layer
``midlayer`` whose attention input is ``[input_layernorm(embed(x)), hidden_norm(fc(h))]`` (2 x hidden),
a final ``norm`` and a ``lm_head``. It is trained to attend like the target, from the target's hidden
states of the previous position, which is what makes it a good retrieval head: its attention at the
token being decoded is known before the target's layer 0 runs.

For retrieval only ``fc``, the two input norms and the Q/K projections are needed (the V/O
projections, MLP, final norm and lm_head are never loaded): that is the pruning this module applies
by construction; :mod:`.calibrate` further keeps only the best heads.

Pairing, as in EAGLE-3 training: the head's key at position p is built from token x_p and the
target's hidden states at position p-1 (zeros for p = 0). At decode step t the query comes from the
token x_t being fed and the hidden states the target produced at t-1 in the previous step.

Draft heads -> target KV groups: by default every draft head votes for every group (the summed
attention of all heads ranks tokens for all layers); a calibrated ``head_map`` lists, per target KV
group, the draft heads whose attention agrees best with that group.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .base import KeyCache, RetrievalHead, vote_for_groups

logger = logging.getLogger(__name__)

KEEP = (
    "fc.weight",
    "fc.bias",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.q_proj.bias",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.k_proj.bias",
)
REQUIRED = ("fc.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight")


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def is_eagle3_checkpoint(path: str | Path) -> bool:
    """A directory with config.json and safetensors holding ``fc`` and ``midlayer`` weights."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    names: set[str] = set()
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return all(name in names for name in REQUIRED)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Eagle3Head(RetrievalHead):
    """Retrieval with an EAGLE-3 draft head, fed with the target's hidden states of the previous step.

    Args:
        path: the checkpoint directory (config.json + *.safetensors).
        embedding: the target's input embedding (EAGLE-3 heads share it).
        num_target_layers: the target's decoder layers (default aux layers: 2, n // 2, n - 3).
        num_target_kv_heads: KV heads of the target (the groups to score for).
        head_map: per target KV group, the draft heads that vote for it (None: all heads for all groups).
    """

    name = "eagle3"

    def __init__(
        self,
        path: str | Path,
        embedding: torch.nn.Module,
        num_target_layers: int,
        num_target_kv_heads: int,
        head_map: list[list[int]] | None = None,
    ):
        self.path = Path(path)
        config = json.loads((self.path / "config.json").read_text())
        self.config = config
        self.embedding = embedding
        weight = embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.hidden = int(config["hidden_size"])
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.num_heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        aux = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        self.aux_layers = tuple(aux) if aux else (2, num_target_layers // 2, num_target_layers - 3)
        self.num_target_kv_heads = num_target_kv_heads
        self.head_map = head_map
        self.tensors, self.checkpoint_parameters = self._load()
        self.heads = list(range(self.num_heads))  # query heads kept (all until pruned)
        self._rope = self._build_rope(config)
        self.cache = KeyCache()
        self.last_hidden: torch.Tensor | None = None

    def _load(self) -> tuple[dict[str, torch.Tensor], int]:
        tensors: dict[str, torch.Tensor] = {}
        total = 0
        for file in _weight_files(self.path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    total += _numel(f.get_slice(name).get_shape())
                    if name in KEEP:
                        tensors[name] = f.get_tensor(name).to(self.device, self.dtype)
        missing = [name for name in REQUIRED if name not in tensors]
        if missing:
            raise ValueError(f"{self.path} is not an EAGLE-3 head: missing {missing}")
        q_rows = tensors["midlayer.self_attn.q_proj.weight"].shape[0]
        if q_rows != self.num_heads * self.head_dim:
            raise ValueError(f"{self.path}: q_proj has {q_rows} rows, config says {self.num_heads} heads x {self.head_dim}")
        return tensors, total

    def _build_rope(self, config: dict):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        fields = {k: v for k, v in config.items() if k in ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")}
        llama = LlamaConfig(hidden_size=self.hidden, num_attention_heads=self.num_heads, head_dim=self.head_dim, **fields)
        return LlamaRotaryEmbedding(llama).to(self.device)

    def cache_bytes_per_token(self) -> int:
        return self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    # -- the head's math ------------------------------------------------------------------------------
    def _project(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, name: str, heads: int):
        """Q or K of the midlayer: [B, heads, T, D], with RoPE at ``positions``."""
        t = self.tensors
        embeds = self.embedding(input_ids).to(self.dtype)
        fused = torch.nn.functional.linear(hidden.to(self.dtype), t["fc.weight"], t.get("fc.bias"))
        x = torch.cat(
            [
                rms_norm(embeds, t.get("midlayer.input_layernorm.weight", torch.ones_like(embeds[0, 0])), self.eps),
                rms_norm(fused, t["midlayer.hidden_norm.weight"], self.eps),
            ],
            dim=-1,
        )
        proj = torch.nn.functional.linear(x, t[f"midlayer.self_attn.{name}_proj.weight"], t.get(f"midlayer.self_attn.{name}_proj.bias"))
        batch, length = input_ids.shape
        proj = proj.view(batch, length, heads, self.head_dim).transpose(1, 2)
        cos, sin = self._rope(proj, positions)
        cos, sin = cos[:, None].to(proj.dtype), sin[:, None].to(proj.dtype)
        return proj * cos + rotate_half(proj) * sin

    def reset(self, batch: int, reserve_tokens: int) -> None:
        self.cache.reset(reserve_tokens)
        self.last_hidden = None

    def snapshot(self):
        return self.cache.length, self.last_hidden

    def restore(self, state) -> None:
        length, self.last_hidden = state
        self.cache.truncate(length)

    def observe_step(self, input_ids, attention_mask, position_ids, aux_hidden) -> None:
        """After a target step: extend the key cache with the step's tokens (paired with hidden p-1)."""
        current = torch.cat([h.to(self.dtype) for h in aux_hidden], dim=-1)  # [B, T, 3 * target hidden]
        batch, length = input_ids.shape
        first = self.last_hidden if self.last_hidden is not None else current.new_zeros(batch, 1, current.shape[-1])
        previous = torch.cat([first, current[:, :-1]], dim=1)
        self.cache.append(self._project(input_ids, previous, position_ids, "k", self.num_kv_heads))
        self.last_hidden = current[:, -1:]

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
        """float [B, Hkv_target, past] from the head's attention of the token being decoded."""
        position_ids = attention_mask.long().sum(-1, keepdim=True) - 1
        if self.last_hidden is None:
            raise RuntimeError("EAGLE-3 head has seen no step yet: prefill must run first")
        query = self._project(input_ids, self.last_hidden, position_ids, "q", len(self.heads))  # [B, Hkept, 1, D]
        groups = self.num_heads // self.num_kv_heads
        keys = self.cache.view(past, [h // groups for h in self.heads])
        logits = torch.matmul(query, keys.transpose(-1, -2)).float()[:, :, 0] * self.head_dim**-0.5
        probs = torch.softmax(logits, dim=-1)  # [B, Hkept, past]
        return vote_for_groups(probs, self.heads, self.head_map, self.num_target_kv_heads)

    # -- calibration: every head's attention over a whole sequence, pruning, saving ------------------------
    def attention_rows(self, model, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries [H, T, D] and keys [Hkv, T, D] of every position of ``sequence``, from one target forward."""
        with torch.no_grad():
            out = model(input_ids=sequence.to(self.device), output_hidden_states=True, use_cache=False)
            current = torch.cat([out.hidden_states[i] for i in self.aux_layers], dim=-1)
            previous = torch.cat([torch.zeros_like(current[:, :1]), current[:, :-1]], dim=1)
            positions = torch.arange(sequence.shape[1], device=self.device)[None]
            queries = self._project(sequence.to(self.device), previous, positions, "q", len(self.heads))
            keys = self._project(sequence.to(self.device), previous, positions, "k", self.num_kv_heads)
        return queries[0].float(), keys[0].float(), self.head_dim**-0.5

    def pruned(self, heads: list[int], head_map: list[list[int]]) -> "Eagle3Head":
        """The same head keeping only the Q rows of ``heads``, voting for target groups by ``head_map``."""
        head = copy.copy(self)
        head.cache = KeyCache()
        rows = torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads]).to(self.device)
        head.tensors = dict(self.tensors)
        for suffix in ("weight", "bias"):
            name = f"midlayer.self_attn.q_proj.{suffix}"
            if name in self.tensors:
                head.tensors[name] = self.tensors[name][rows]
        head.heads = sorted(heads)
        head.head_map = head_map
        return head

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    @classmethod
    def from_saved(cls, manifest: dict, tensors: dict[str, torch.Tensor], model) -> "Eagle3Head":
        from ..planning import num_kv_heads

        config = manifest["draft_config"]
        n = model.config.num_hidden_layers
        aux = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux_layers = tuple(aux) if aux else (2, n // 2, n - 3)
        return cls.from_parts(config, tensors, model.get_input_embeddings(), aux_layers, num_kv_heads(model.config),
                              manifest["heads"], manifest["head_map"], manifest["parameters_before"])

    @classmethod
    def from_parts(cls, config: dict, tensors: dict[str, torch.Tensor], embedding: torch.nn.Module,
                   aux_layers: tuple[int, ...], num_target_kv_heads: int, heads: list[int],
                   head_map: list[list[int]] | None, checkpoint_parameters: int) -> "Eagle3Head":
        """The head from its kept tensors and the fields of its checkpoint's ``config`` it reads (a calibrated
        head's directory, an exported artifact): no checkpoint directory."""
        head = cls.__new__(cls)
        head.path = None
        head.config = config
        head.embedding = embedding
        head.device, head.dtype = embedding.weight.device, embedding.weight.dtype
        head.hidden = int(config["hidden_size"])
        head.num_heads = int(config["num_attention_heads"])
        head.num_kv_heads = int(config.get("num_key_value_heads") or head.num_heads)
        head.head_dim = int(config.get("head_dim") or head.hidden // head.num_heads)
        head.eps = float(config.get("rms_norm_eps", 1e-6))
        head.aux_layers = tuple(aux_layers)
        head.num_target_kv_heads = num_target_kv_heads
        head.head_map = head_map
        head.heads = list(heads)
        head.tensors = tensors
        head.checkpoint_parameters = checkpoint_parameters
        head._rope = head._build_rope(config)
        head.cache, head.last_hidden = KeyCache(), None
        return head

    #: The checkpoint config fields ``_build_rope`` reads (besides the sizes).
    ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")

    def export_config(self) -> dict:
        """The checkpoint config fields the head reads, resolved as it uses them (defaults filled in): what
        an exported artifact stores, and all :meth:`from_parts` needs."""
        config = {"hidden_size": self.hidden, "num_attention_heads": self.num_heads,
                  "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rms_norm_eps": self.eps}
        config.update({k: self.config[k] for k in self.ROPE_FIELDS if self.config.get(k) is not None})
        return config


class TargetEmbedding(torch.nn.Module):
    """The target's input embedding made of a loaded program's tensors (an artifact has no HF model):
    ``weight[ids]``, times ``scale`` for the families whose embedding scales (Gemma 3's ``embed_scale``)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight  # the program's own tensor, shared: no second copy of the embedding
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.embedding(input_ids, self.weight)
        return out if self.scale is None else out * self.scale.to(self.weight.dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
