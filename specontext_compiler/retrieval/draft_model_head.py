"""A small homologous model (same tokenizer) as the distilled model that retrieves for the target.

The draft reads the same tokens as the target. At decode step t it consumes the token x_t being fed
*before* the target's layer 0 runs, and its attention at one scoring layer ranks the context. Only what
that needs is kept (the head-level pruning of the paper):

* the *body*: the draft's embedding and its decoder layers below the scoring layer (their outputs are
  the scoring layer's input), run by transformers with the draft's own KV cache, final norm and
  lm_head dropped;
* the *scorer*: the scoring layer's input norm and the Q/K rows of the kept heads (plus q/k norms where
  the family has them), applied here; V/O, the MLP and every layer above are dropped.

Draft heads -> target KV groups: ``head_map[g]`` lists the draft query heads whose attention ranks
tokens for target KV group g (:func:`specontext.calibrate` measures it); by default every kept head
votes for every group.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import DynamicCache, PreTrainedModel

from .base import KeyCache, RetrievalHead, decoder_of, vote_for_groups
from .eagle3 import rotate_half

logger = logging.getLogger(__name__)


class DraftModelHead(RetrievalHead):
    """Retrieval by a draft model's attention at ``layer`` (query heads ``heads``; None = all)."""

    name = "draft_model"

    def __init__(
        self,
        draft: PreTrainedModel,
        num_target_kv_heads: int,
        layer: int | None = None,
        heads: list[int] | None = None,
        head_map: list[list[int]] | None = None,
    ):
        num_layers = draft.config.num_hidden_layers
        layer = round(5 / 6 * (num_layers - 1)) if layer is None else layer
        if not 0 <= layer < num_layers:
            raise ValueError(f"draft scoring layer {layer} outside 0..{num_layers - 1}")
        self._init_from(draft, layer, heads, head_map, num_target_kv_heads)
        self.original_parameters = sum(p.numel() for p in draft.parameters())

    def _init_from(self, draft, layer, heads, head_map, num_target_kv_heads) -> None:
        config = draft.config
        self.draft_config = config.to_dict()  # what export writes to rebuild the body (artifact_head.py)
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.heads = list(range(self.num_heads)) if heads is None else sorted(heads)
        self.kv_heads = sorted({h // self.groups for h in self.heads})
        self.num_target_kv_heads = num_target_kv_heads
        self.head_map = head_map
        if head_map is not None and len(head_map) != num_target_kv_heads:
            raise ValueError(f"head_map has {len(head_map)} groups, the target has {num_target_kv_heads} KV heads")
        self.body, self.scorer = self._prune(draft)
        self.cache: DynamicCache | None = None  # the body's own KV (transformers)
        self.keys = KeyCache()  # the scoring layer's keys of the kept KV heads

    # -- pruning ---------------------------------------------------------------------------------------
    def _prune(self, draft: PreTrainedModel):
        base = decoder_of(draft)
        attention = base.layers[self.layer].self_attn
        layer = base.layers[self.layer]
        head_dim = attention.head_dim
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in self.heads])
        k_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in self.kv_heads])

        def rows(linear: torch.nn.Linear, index: torch.Tensor) -> torch.nn.Linear:
            pruned = torch.nn.Linear(linear.in_features, index.numel(), bias=linear.bias is not None,
                                     device=linear.weight.device, dtype=linear.weight.dtype)
            with torch.no_grad():
                pruned.weight.copy_(linear.weight[index.to(linear.weight.device)])
                if linear.bias is not None:
                    pruned.bias.copy_(linear.bias[index.to(linear.weight.device)])
            return pruned

        scorer = torch.nn.ModuleDict(
            {
                "input_norm": copy.deepcopy(layer.input_layernorm),
                "q_proj": rows(attention.q_proj, q_rows),
                "k_proj": rows(attention.k_proj, k_rows),
            }
        )
        for name in ("q_norm", "k_norm"):
            if hasattr(attention, name):
                scorer[name] = copy.deepcopy(getattr(attention, name))
        self.head_dim = head_dim
        self.scale = getattr(attention, "scaling", head_dim**-0.5)

        # The body: embedding + layers below the scoring layer, sharing the draft's weights, no final norm.
        memo = {id(t): t for t in draft.parameters()}
        memo.update({id(t): t for t in draft.buffers()})
        body = copy.deepcopy(base, memo)
        body.layers = torch.nn.ModuleList(list(body.layers)[: self.layer])
        body.config.num_hidden_layers = self.layer
        if hasattr(body.config, "layer_types") and body.config.layer_types is not None:
            body.config.layer_types = body.config.layer_types[: self.layer]
        body.norm = torch.nn.Identity()
        body.eval()
        return body, scorer

    # -- saving and loading (safetensors + the JSON manifest of calibrate) -------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"body.{k}": v for k, v in self.body.state_dict().items()}
        tensors.update({f"scorer.{k}": v for k, v in self.scorer.state_dict().items()})
        return tensors

    @classmethod
    def from_saved(cls, manifest: dict, tensors: dict[str, torch.Tensor], num_target_kv_heads: int, device, dtype):
        """Rebuild from a calibrated head: the body from the draft's config, weights from safetensors."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(manifest["draft_config"])
        model_type = config.pop("model_type")
        layer = manifest["layer"]
        config["num_hidden_layers"] = layer + 1
        if config.get("layer_types") is not None:
            config["layer_types"] = config["layer_types"][: layer + 1]
        skeleton_config = AutoConfig.for_model(model_type, **config)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(skeleton_config)
        head = cls.__new__(cls)
        head._init_from(skeleton, layer, manifest["heads"], manifest["head_map"], num_target_kv_heads)
        head.body.to_empty(device=device)
        head.scorer.to_empty(device=device)
        head.body.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("body.")})
        head.scorer.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("scorer.")})
        rotary = type(head.body.rotary_emb)(config=head.body.config, device=device)
        head.body.rotary_emb = rotary
        head.body.to(dtype)
        head.scorer.to(dtype)
        head.original_parameters = manifest["parameters_before"]
        return head

    # -- exported artifacts (artifact_head.py): every tensor, rebuilt without initializing anything ---------
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the body and the scorer, non-persistent buffers included (the
        rotary frequencies, Gemma 3's embedding scale): :meth:`load_tensors` sets each from its copy."""
        tensors = {}
        for prefix, module in (("body.", self.body), ("scorer.", self.scorer)):
            tensors.update({prefix + name: t for name, t in module.named_parameters(remove_duplicate=False)})
            tensors.update({prefix + name: t for name, t in module.named_buffers(remove_duplicate=False)})
        return tensors

    @classmethod
    def skeleton(cls, draft_config: dict, layer: int, heads: list[int], head_map: list[list[int]] | None,
                 num_target_kv_heads: int, attn_implementation: str = "sdpa") -> "DraftModelHead":
        """The head for a draft of ``draft_config`` (its ``model_type`` and fields) with every tensor on the
        meta device: nothing allocated or initialized until :meth:`load_tensors`."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(draft_config)
        skeleton_config = AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.device("meta"):
            draft = AutoModelForCausalLM.from_config(skeleton_config, attn_implementation=attn_implementation)
        head = cls.__new__(cls)
        head._init_from(draft, layer, heads, head_map, num_target_kv_heads)
        head.original_parameters = 0
        return head

    def load_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device | str) -> None:
        """Set every parameter and buffer from ``tensors`` (named as :meth:`export_tensors` names them):
        each must be given, with its shape; a missing, extra or misshapen one raises ``ValueError``."""
        expected = {}
        for prefix, module in (("body.", self.body), ("scorer.", self.scorer)):
            for kind, named in (("_parameters", module.named_parameters(remove_duplicate=False)),
                                ("_buffers", module.named_buffers(remove_duplicate=False))):
                for name, tensor in named:
                    owner, _, leaf = name.rpartition(".")
                    expected[prefix + name] = (module.get_submodule(owner), kind, leaf, tensor)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"the draft head's tensors do not match its description: missing {missing[:8]}, "
                             f"unexpected {extra[:8]}")
        for name, (owner, kind, leaf, meta) in expected.items():
            tensor = tensors[name]
            if tensor.shape != meta.shape or tensor.is_floating_point() != meta.is_floating_point():
                raise ValueError(f"the draft head's tensor {name} has shape {tuple(tensor.shape)} and dtype "
                                 f"{tensor.dtype}; its description needs shape {tuple(meta.shape)} "
                                 f"({'floating point' if meta.is_floating_point() else 'integer'})")
        for name, (owner, kind, leaf, _) in expected.items():
            tensor = tensors[name].to(device)
            if kind == "_parameters":
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            getattr(owner, kind)[leaf] = tensor
        self.body.eval()

    def cache_bytes_per_token(self) -> int:
        size = next(self.scorer.parameters()).element_size()
        config = self.body.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        body_layers = 0 if not self.layer else len(self.body.layers)
        return (len(self.kv_heads) + 2 * kv_heads * body_layers) * self.head_dim * size  # scoring keys + body's KV

    def parameter_count(self) -> int:
        seen = {id(p): p for p in list(self.body.parameters()) + list(self.scorer.parameters())}
        return sum(p.numel() for p in seen.values())

    # -- running -------------------------------------------------------------------------------------
    def reset(self, batch: int, reserve_tokens: int) -> None:
        self.cache = DynamicCache(config=self.body.config) if self.layer else None
        self.keys.reset(reserve_tokens)

    def snapshot(self):
        return self.keys.length

    def restore(self, state) -> None:
        self.keys.truncate(state)
        if self.cache is not None and self.cache.get_seq_length() > state:
            self.cache.crop(state)

    def _advance(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the body on tokens the head has not seen; returns their queries [B, Hkept, T, D]."""
        new = input_ids.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -new:]
        with torch.no_grad():
            if self.layer:
                out = self.body(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=self.cache, use_cache=True,
                )
                hidden = out.last_hidden_state
            else:
                hidden = self.body.embed_tokens(input_ids)
            cos, sin = self.body.rotary_emb(hidden, position_ids)
            x = self.scorer["input_norm"](hidden)
            batch = input_ids.shape[0]
            q = self.scorer["q_proj"](x).view(batch, new, len(self.heads), self.head_dim)
            k = self.scorer["k_proj"](x).view(batch, new, len(self.kv_heads), self.head_dim)
            if "q_norm" in self.scorer:
                q, k = self.scorer["q_norm"](q), self.scorer["k_norm"](k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = cos[:, None], sin[:, None]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        self.keys.append(k)
        return q

    def observe_step(self, input_ids, attention_mask, position_ids, aux_hidden) -> None:
        total = attention_mask.shape[1]
        if self.keys.length < total:  # tokens the scoring did not already consume (prefill, dense steps)
            unseen = total - self.keys.length
            self._advance(input_ids[:, -unseen:], attention_mask)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
        if self.keys.length != past:
            raise RuntimeError(f"draft head holds {self.keys.length} tokens, the target {past}: prefill must run first")
        query = self._advance(input_ids, attention_mask)  # consumes x_t: [B, Hkept, 1, D]
        kv_of_head = [self.kv_heads.index(h // self.groups) for h in self.heads]
        keys = self.keys.view(past, kv_of_head)
        logits = torch.matmul(query, keys.transpose(-1, -2)).float()[:, :, 0] * self.scale
        valid = attention_mask[:, :past].bool()
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [B, Hkept, past]
        return vote_for_groups(probs, self.heads, self.head_map, self.num_target_kv_heads)
