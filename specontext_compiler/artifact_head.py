"""The retrieval head of an exported artifact as data: ``head.json`` (kind and settings) plus tensors
(``head.safetensors``).

:func:`head_description` writes it; :func:`head_from_description` checks every field against
``HEADS`` (what each kind needs) and ``TARGET_LAYER_OPTIONS`` (keys added since) and rebuilds the head,
raising :class:`HeadDescriptionError` (the loader adds the file's name) for anything else.

Kinds: the draft-free head (``target_layer``), the baselines, and the heads with weights:
``draft_model`` (a homologous draft's body and scorer, rebuilt from its transformers config on the meta
device, then every parameter and buffer set from the safetensors: nothing initialized, nothing unpickled)
and ``eagle3`` (the kept EAGLE-3 tensors, and the target's input embedding taken from the loaded
program's own parameters by name, so it is stored once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .retrieval.target_layer_head import COMBINE


class HeadDescriptionError(ValueError):
    """``head.json`` (or, for a tensor, ``head.safetensors``: ``file``) holds a value the loader does not accept."""

    def __init__(self, problem: str, file: str = "head.json"):
        super().__init__(problem)
        self.file = file


@dataclass(frozen=True)
class TargetParts:
    """What a loaded artifact offers the head it rebuilds besides the head's own tensors."""

    num_layers: int | None
    num_kv_heads: int | None
    hidden_size: int | None
    vocab_size: int | None
    #: The target layers whose hidden states the program returns (options.json): an EAGLE-3 head's inputs.
    aux_layers: tuple[int, ...]
    #: The loaded program's parameters and constants by name (an EAGLE-3 head's embedding is one).
    tensors: Mapping[str, torch.Tensor]
    device: torch.device
    dtype: torch.dtype


def is_int(value) -> bool:
    """An int and not a bool (JSON's true/false load as bools, which are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def head_description(head, program: torch.export.ExportedProgram | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``head.json``'s object and the tensors for ``head.safetensors``; ``program``: the exported step (an
    EAGLE-3 head names the embedding parameter it shares with it). Raises ``ValueError`` for a head export
    does not support, before anything is written."""
    from .retrieval import DraftModelHead, Eagle3Head, OracleTopK, QuestPages, StreamingLLM, TargetLayerHead

    if head is None:
        return {"kind": "none"}, {}
    if isinstance(head, TargetLayerHead):
        if head.query != "previous":  # its fit reads the target's modules, which an artifact does not hold
            raise ValueError(f"export does not support the draft-free head with query={head.query!r} yet; "
                             "accepted: query='previous' (the default)")
        return {"kind": "target_layer", "layers": list(head.layers), "prefill_prior": head.prefill_prior,
                "query_weight": head.query_weight, "lookahead": head.lookahead, "lookbehind": head.lookbehind,
                "prior_window": head.prior_window, "prior_from": head.prior_from, "combine": head.combine}, {}
    if isinstance(head, StreamingLLM):
        return {"kind": "streaming"}, {}
    if isinstance(head, QuestPages):
        return {"kind": "quest", "page_size": head.page_size}, {}
    if isinstance(head, OracleTopK):
        return {"kind": "oracle"}, {}
    if isinstance(head, DraftModelHead):
        return _draft_model_description(head)
    if isinstance(head, Eagle3Head):
        return _eagle3_description(head, program)
    raise ValueError(
        f"export does not support a {type(head).__name__} retrieval head; supported: the draft-free head "
        "(draft=None, or a calibrated draft-free head), a draft model's head, an EAGLE-3 head (each also "
        "calibrated) and the baselines (streaming, quest, oracle)"
    )


# -- draft_model ------------------------------------------------------------------------------------------
#: How the draft's body may run attention in a loaded artifact: transformers' own implementations (others
#: load kernels, some from the Hub).
DRAFT_ATTENTION = ("sdpa", "eager")
#: Config fields never stored or accepted for a draft: code and kernel requests, quantization, provenance.
DRAFT_CONFIG_REFUSED = frozenset({"auto_map", "quantization_config", "attn_implementation", "dtype", "torch_dtype",
                                  "architectures", "transformers_version", "trust_remote_code"})
#: The deepest scoring layer accepted (a description must not make the loader build an arbitrarily deep skeleton).
MAX_DRAFT_LAYER = 1023
#: Bounds on a head config's attention sizes (draft model, EAGLE-3): pruning builds row indices of heads x head_dim
#: on the CPU.
SIZE_BOUNDS = {"hidden_size": 65536, "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096}


def draft_config_fields(model_type: str) -> frozenset[str]:
    """The config fields a draft of ``model_type`` may store: those of transformers' config class for the
    family, less :data:`DRAFT_CONFIG_REFUSED` and private ones."""
    from transformers import CONFIG_MAPPING

    fields = CONFIG_MAPPING[model_type]().to_dict()
    return frozenset(k for k in fields if not k.startswith("_")) - DRAFT_CONFIG_REFUSED


def _draft_model_description(head) -> tuple[dict, dict[str, torch.Tensor]]:
    from .capture import SUPPORTED_FAMILIES

    config = dict(head.draft_config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"export supports a draft model of the supported families ({', '.join(SUPPORTED_FAMILIES)}); "
                         f"this draft's model_type is {model_type!r}")
    attention = getattr(head.body.config, "_attn_implementation", None) or "sdpa"
    if attention not in DRAFT_ATTENTION:
        accepted = " or ".join(map(repr, DRAFT_ATTENTION))
        raise ValueError(f"export supports a draft running attn_implementation {accepted}; this draft runs "
                         f"{attention!r} (draft.set_attn_implementation('sdpa') first)")
    fields = draft_config_fields(model_type)
    kept = {k: v for k, v in config.items() if k in fields}
    kept["model_type"] = model_type
    kept["num_hidden_layers"] = head.layer + 1  # the body and the scoring layer: the skeleton load builds
    if isinstance(kept.get("layer_types"), list):
        kept["layer_types"] = kept["layer_types"][: head.layer + 1]
    description = {"kind": "draft_model", "config": kept, "layer": head.layer, "heads": list(head.heads),
                   "head_map": _head_map(head.head_map), "attn_implementation": attention, "parameters_before": int(head.original_parameters)}
    return description, head.export_tensors()


def _head_map(head_map) -> list[list[int]] | None:
    return None if head_map is None else [[int(h) for h in group] for group in head_map]


def _draft_model_head(description: dict, tensors: dict[str, torch.Tensor], target: TargetParts):
    from transformers import CONFIG_MAPPING

    from .capture import SUPPORTED_FAMILIES
    from .retrieval import DraftModelHead

    config = description["config"]
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES or model_type not in CONFIG_MAPPING:
        raise HeadDescriptionError(f"config.model_type is {model_type!r}; accepted: {', '.join(SUPPORTED_FAMILIES)}")
    fields = draft_config_fields(model_type) | {"model_type"}
    unknown = sorted(k for k in config if k not in fields)
    if unknown:
        raise HeadDescriptionError(f"config holds {unknown[:8]}, not fields of a {model_type} config (or refused: "
                                   f"{', '.join(sorted(DRAFT_CONFIG_REFUSED))}); accepted: the fields of "
                                   f"transformers' {model_type} config")
    layer = description["layer"]
    if config.get("num_hidden_layers") != layer + 1:
        raise HeadDescriptionError(f"config.num_hidden_layers is {config.get('num_hidden_layers')!r}; accepted: layer + 1 "
                                   f"= {layer + 1} (the body below the scoring layer, and that layer)")
    if target.vocab_size is not None and config.get("vocab_size") != target.vocab_size:
        raise HeadDescriptionError(f"config.vocab_size is {config.get('vocab_size')!r}; accepted: the model's "
                                   f"{target.vocab_size} (a draft shares the target's tokenizer)")
    for key, bound in SIZE_BOUNDS.items():
        value = config.get(key)
        if (key in ("hidden_size", "num_attention_heads") or value is not None) and not (is_int(value) and 0 < value <= bound):
            raise HeadDescriptionError(f"config.{key} is {value!r}; accepted: an integer in [1, {bound}]")
    _check_heads(description, config["num_attention_heads"], target)
    try:
        head = DraftModelHead.skeleton(config, layer, description["heads"], description["head_map"],
                                       target.num_kv_heads, description["attn_implementation"])
    except Exception as error:  # transformers raises many types for a config it cannot build
        raise HeadDescriptionError(f"config does not build a {model_type} draft ({type(error).__name__}: "
                                   f"{error})") from None
    try:
        head.load_tensors(tensors, target.device)
    except ValueError as error:
        raise HeadDescriptionError(str(error), file="head.safetensors") from None
    head.original_parameters = description["parameters_before"]
    return head


def _check_heads(description: dict, num_heads: int, target: TargetParts) -> None:
    """``heads``: the kept query heads (sorted, distinct, below ``num_heads``); ``head_map``: null or, per
    target KV group, the kept heads that vote for it."""
    heads = description["heads"]
    if sorted(set(heads)) != heads or heads[-1] >= num_heads:
        raise HeadDescriptionError(f"heads is {heads!r}; accepted: distinct query heads in increasing order, each "
                                   f"below the draft's {num_heads}")
    head_map = description["head_map"]
    if head_map is None:
        return
    if target.num_kv_heads is None or len(head_map) != target.num_kv_heads or any(
            not group or any(h not in heads for h in group) for group in head_map):
        raise HeadDescriptionError(f"head_map is {str(head_map)[:200]}; accepted: null, or one non-empty list of kept "
                                   f"heads per KV head of the model ({target.num_kv_heads})")


# -- eagle3 -----------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rope(value) -> bool:
    """A rope_scaling / rope_parameters object: names to numbers, strings, booleans, null or number lists
    (transformers resolves ``rope_type`` from its own table)."""
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    for key, item in value.items():
        number_list = isinstance(item, list) and len(item) <= 4096 and all(map(_is_number, item))
        if not (isinstance(key, str) and (item is None or isinstance(item, (str, bool)) or _is_number(item) or number_list)):
            return False
    return True


EAGLE3_CONFIG = {  # head.json config of an eagle3 head: key -> (check, what is accepted)
    **{key: (lambda v, bound=bound: is_int(v) and 0 < v <= bound, f"an integer in [1, {bound}]")
       for key, bound in SIZE_BOUNDS.items() if key != "head_dim"},
    "head_dim": (lambda v: is_int(v) and 0 < v <= SIZE_BOUNDS["head_dim"] and v % 2 == 0,
                 f"an even integer in [2, {SIZE_BOUNDS['head_dim']}]"),
    "rms_norm_eps": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "rope_theta": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "max_position_embeddings": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "rope_scaling": (_is_rope, "null or an object of numbers, strings and number lists"),
    "rope_parameters": (_is_rope, "null or an object of numbers, strings and number lists"),
}
EAGLE3_REQUIRED = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps")


def program_tensors(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The exported program's parameters, buffers and constants by name: what a head may share with it."""
    return {**program.state_dict, **program.constants}


def _program_tensor(program, tensor: torch.Tensor) -> str | None:
    """The name of ``tensor`` among :func:`program_tensors` (the same object)."""
    for name, value in program_tensors(program).items():
        if value is tensor:
            return name
    return None


def _eagle3_description(head, program) -> tuple[dict, dict[str, torch.Tensor]]:
    from .retrieval.eagle3 import TargetEmbedding

    embedding = head.embedding
    if isinstance(embedding, TargetEmbedding):  # a loaded artifact's head, exported again
        weight, scale = embedding.weight, embedding.scale
    elif isinstance(embedding, torch.nn.Embedding) and embedding.max_norm is None and (
            type(embedding) is torch.nn.Embedding or type(embedding).__name__.endswith("ScaledWordEmbedding")):
        weight, scale = embedding.weight, getattr(embedding, "embed_scale", None)
    else:
        raise ValueError(f"export supports an EAGLE-3 head over a torch.nn.Embedding (or transformers' scaled word "
                         f"embedding); this head's embedding is a {type(embedding).__name__}")
    names = {}
    for part, tensor in (("weight", weight), ("scale", scale)):
        names[part] = None if tensor is None or program is None else _program_tensor(program, tensor)
        if tensor is not None and names[part] is None:
            raise ValueError(f"the EAGLE-3 head's embedding {part} is not a tensor of the exported program: export "
                             "stores the head's own tensors and names the embedding it shares with the target")
    description = {"kind": "eagle3", "config": head.export_config(), "aux_layers": list(head.aux_layers),
                   "heads": list(head.heads), "head_map": _head_map(head.head_map),
                   "parameters_before": int(head.checkpoint_parameters), "embedding": names}
    return description, dict(head.tensors)


def _eagle3_head(description: dict, tensors: dict[str, torch.Tensor], target: TargetParts):
    from .retrieval.eagle3 import KEEP, REQUIRED, Eagle3Head, TargetEmbedding

    config = description["config"]
    unknown = sorted(set(config) - set(EAGLE3_CONFIG))
    if unknown:
        raise HeadDescriptionError(f"config holds {unknown[:8]}; accepted: an object of {', '.join(EAGLE3_CONFIG)}")
    for key, (accepts, what) in EAGLE3_CONFIG.items():
        if (key in EAGLE3_REQUIRED or key in config) and (key not in config or not accepts(config[key])):
            raise HeadDescriptionError(f"config.{key} is {config.get(key, 'missing')!r}; accepted: {what}")
    num_heads, num_kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    if num_heads % num_kv_heads:
        raise HeadDescriptionError(f"config.num_attention_heads {num_heads} is not a multiple of "
                                   f"num_key_value_heads {num_kv_heads}")
    if description["aux_layers"] != list(target.aux_layers):
        raise HeadDescriptionError(f"aux_layers is {description['aux_layers']!r}; accepted: options.json's "
                                   f"{list(target.aux_layers)} (the hidden states the exported program returns)")
    _check_heads(description, num_heads, target)
    embedding = description["embedding"]
    if not isinstance(embedding, dict) or set(embedding) != {"weight", "scale"}:
        raise HeadDescriptionError(f"embedding is {embedding!r}; accepted: an object of weight and scale (names of the "
                                   "program's tensors; scale may be null)")
    weight = target.tensors.get(embedding["weight"]) if isinstance(embedding["weight"], str) else None
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point()
            or (target.vocab_size is not None and weight.shape[0] != target.vocab_size)):
        raise HeadDescriptionError(f"embedding.weight is {embedding['weight']!r}; accepted: the name of the program's "
                                   f"[vocabulary, hidden] floating-point embedding parameter")
    scale = None
    if embedding["scale"] is not None:
        scale = target.tensors.get(embedding["scale"]) if isinstance(embedding["scale"], str) else None
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not scale.is_floating_point():
            raise HeadDescriptionError(f"embedding.scale is {embedding['scale']!r}; accepted: null or the name of one of "
                                       "the program's one-element floating-point tensors")
    # The shapes the head's math needs, so a mismatch is refused here rather than met mid-generation.
    hidden, width = config["hidden_size"], weight.shape[1] + config["hidden_size"]
    fused = len(target.aux_layers) * (target.hidden_size or 0)
    shapes = {"fc.weight": (hidden, fused), "fc.bias": (hidden,), "midlayer.input_layernorm.weight": (weight.shape[1],),
              "midlayer.hidden_norm.weight": (hidden,),
              "midlayer.self_attn.q_proj.weight": (len(description["heads"]) * head_dim, width),
              "midlayer.self_attn.q_proj.bias": (len(description["heads"]) * head_dim,),
              "midlayer.self_attn.k_proj.weight": (num_kv_heads * head_dim, width),
              "midlayer.self_attn.k_proj.bias": (num_kv_heads * head_dim,)}  # KEEP's names
    missing, extra = [n for n in REQUIRED if n not in tensors], sorted(set(tensors) - set(KEEP))
    if missing or extra:
        raise HeadDescriptionError(f"the EAGLE-3 head's tensors lack {missing} or hold unexpected {extra[:8]}; accepted: "
                                   f"{', '.join(KEEP)} ({', '.join(REQUIRED)} required)", file="head.safetensors")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != shapes[name] or not tensor.is_floating_point():
            raise HeadDescriptionError(f"{name} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; accepted: "
                                       f"floating point of shape {shapes[name]}", file="head.safetensors")
    module = TargetEmbedding(weight, scale)
    kept = {name: tensor.to(target.device, weight.dtype) for name, tensor in tensors.items()}
    try:
        return Eagle3Head.from_parts(config, kept, module, target.aux_layers, target.num_kv_heads, description["heads"],
                                     description["head_map"], description["parameters_before"])
    except Exception as error:  # transformers' rotary embedding refuses a rope it does not know in its own way
        raise HeadDescriptionError(f"config does not build the head's rotary embedding ({type(error).__name__}: "
                                   f"{error})") from None


_HEAD_LIST = (lambda v: isinstance(v, list) and 0 < len(v) <= 1024 and all(is_int(h) and h >= 0 for h in v),
              "a non-empty list of query head indices")
_HEAD_MAP = (lambda v: v is None or (isinstance(v, list) and len(v) <= 1024 and all(
    isinstance(g, list) and len(g) <= 1024 and all(is_int(h) for h in g) for g in v)), "null or a list of lists of heads")
_COUNT = (lambda v: is_int(v) and v >= 0, "a non-negative integer")
HEADS = {  # head.json: kind -> {key: (check, what is accepted)}
    "none": {}, "streaming": {}, "oracle": {},
    "quest": {"page_size": (lambda v: is_int(v) and v > 0, "a positive integer")},
    "target_layer": {
        "layers": (lambda v: isinstance(v, list) and v and all(is_int(i) and i >= 0 for i in v), "layer indices"),
        "prefill_prior": (lambda v: isinstance(v, bool), "true or false"),
        "query_weight": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    },
    "draft_model": {
        "config": (lambda v: isinstance(v, dict), "an object of the draft's transformers config fields"),
        "layer": (lambda v: is_int(v) and 0 <= v <= MAX_DRAFT_LAYER, f"an integer in [0, {MAX_DRAFT_LAYER}]"),
        "heads": _HEAD_LIST, "head_map": _HEAD_MAP,
        "attn_implementation": (lambda v: v in DRAFT_ATTENTION, " or ".join(map(repr, DRAFT_ATTENTION))),
        "parameters_before": _COUNT,
    },
    "eagle3": {
        "config": (lambda v: isinstance(v, dict), f"an object of {', '.join(EAGLE3_CONFIG)}"),
        "aux_layers": (lambda v: isinstance(v, list) and all(is_int(i) and i >= 0 for i in v), "a list of layer indices"),
        "heads": _HEAD_LIST, "head_map": _HEAD_MAP, "parameters_before": _COUNT,
        "embedding": (lambda v: isinstance(v, dict), "an object of weight and scale"),
    },
}
#: target_layer keys later versions added: key -> (value when absent, as in artifacts from before, check,
#: what is accepted).
TARGET_LAYER_OPTIONS = {
    "lookahead": (0, lambda v: is_int(v) and 0 <= v <= 64, "an integer in [0, 64]"),
    "lookbehind": (0, lambda v: is_int(v) and 0 <= v <= 64, "an integer in [0, 64]"),
    "prior_window": (1, lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
    "prior_from": (0.0, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0,
                   "a number in [0, 1)"),
    "combine": ("sum", lambda v: v in COMBINE, ", ".join(map(repr, COMBINE))),
}


def check_head_fields(description: dict) -> str:
    """The kind of the head ``description`` names, after checking its required fields against ``HEADS`` (no
    model needed: the loader runs this before it loads the program)."""
    kind = description.get("kind")
    if kind not in HEADS:
        raise HeadDescriptionError(f"unknown retrieval head kind {kind!r}; accepted: {', '.join(HEADS)}")
    for key, (accepts, what) in HEADS[kind].items():
        if key not in description or not accepts(description[key]):
            raise HeadDescriptionError(f"{key} is {description.get(key, 'missing')!r}; accepted: {what}")
    return kind


def head_from_description(description: dict, tensors: dict[str, torch.Tensor], layers: int | None,
                          target: TargetParts | None = None):
    """The head ``description`` (``head.json``) and ``tensors`` (``head.safetensors``) describe, for a model
    of ``layers`` layers; ``target``: the loaded model's parts, which the heads with weights need."""
    from .retrieval import OracleTopK, QuestPages, StreamingLLM, TargetLayerHead

    kind = check_head_fields(description)
    if kind in ("draft_model", "eagle3"):
        if target is None or target.num_kv_heads is None:
            raise HeadDescriptionError(f"a {kind} head is rebuilt only with the loaded model's parts (target=, with "
                                       "the model's KV heads)")
        return (_draft_model_head if kind == "draft_model" else _eagle3_head)(description, tensors, target)
    if tensors:
        raise HeadDescriptionError(f"a {kind} head has no tensors; head.safetensors holds {sorted(tensors)[:8]}",
                                   file="head.safetensors")
    if kind == "target_layer":
        if layers is not None and max(description["layers"]) >= layers:
            raise HeadDescriptionError(f"layers {description['layers']} name a layer the model's {layers} lack")
        options = {}
        for key, (absent, accepts, what) in TARGET_LAYER_OPTIONS.items():
            options[key] = description.get(key, absent)
            if not accepts(options[key]):
                raise HeadDescriptionError(f"{key} is {options[key]!r}; accepted: {what}")
        return TargetLayerHead(tuple(description["layers"]), prefill_prior=description["prefill_prior"],
                               query_weight=description["query_weight"], **options)
    return {"none": lambda: None, "streaming": StreamingLLM, "oracle": OracleTopK,
            "quest": lambda: QuestPages(description["page_size"])}[kind]()
