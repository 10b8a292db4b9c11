"""What ``specontext.load`` accepts in a program archive (``step.pt2``) before torch deserializes it.

``torch.export.load`` trusts its input. Reading its code (torch 2.11-2.13) finds these ways an archive can
run code, each refused here:

* Pickles: the sample inputs are read with ``torch.load`` falling back to ``weights_only=False``; weights
  and constants flagged ``use_pickle``, custom and opaque objects and legacy ``.pt`` payloads are unpickled;
  AOTInductor entries load a shared library; and when the archive cannot be read as a PT2 archive, a
  legacy path reads ``serialized_*.pt`` entries through Python's ``zipfile``. Only the entries
  ``torch.export.save`` writes for one plain program are accepted, the sample-inputs record must be
  empty, and every payload must be raw tensor bytes.
* Two zip readers: the scan reads the archive with torch's own reader (``torch._C.PyTorchFileReader``), on
  the same open file torch then loads, and requires Python's ``zipfile`` to list the same entries at the
  same offsets, so the legacy path cannot see entries the scan did not.
* ``eval``: symbolic sizes (``expr_str``) are parsed with ``sympy.sympify``, which evaluates Python, so
  each must be a sympy constructor expression (``Mul(Integer(8), Symbol('s70', positive=True))``) of the
  functions torch writes; ``guards_code`` is ``exec``-ed by ``ExportedProgram.module()``, so each guard
  must be a comparison of input sizes (``L['input_ids'].size()[1] == L['position_ids'].size()[1]``), in
  integer arithmetic without powers and with integers of at most ``MAX_INTEGER`` (``10**10**10`` would
  keep Python busy for ever wherever the guard runs).
* Node targets: any callable reachable by attributes from ``torch``, ``operator`` or ``math`` is accepted
  as a node target and called when the program runs, so a target must be one of the ``aten`` operators
  models are made of (``ALLOWED_ATEN``), a ``specontext`` operator, or a symbolic-size operator.
  Operators run with the program's arguments, so they must also be functional (``copy_`` into a file
  mapped by ``aten::from_file`` writes any file) and take strings only as enumerations (``gelu``'s
  ``approximate``), never as paths; sparse-tensor constructors trusting their indices write out of
  bounds.
* Generated code: ``ExportedProgram.module()`` and the deserializer build Python source from the
  program's names (graph inputs, ``forward_arg_names``, spec keys, parameter paths) and exec it, so every
  name must be an identifier (module paths: identifiers joined by dots); stack traces go into comments,
  so no string may hold a control character other than newline and tab.
* Imports: the pytree spec decoder imports modules named in spec JSON (``__enum__`` objects, node types
  such as ``collections.defaultdict``), so ``in_spec``/``out_spec`` may hold only tuples, lists, dicts
  with identifier keys, and leaves.
* Subgraphs, operator and script-object arguments are refused; size expressions are integer arithmetic
  (no powers: ``Pow(10, 10**8)`` would keep sympy busy). Every integer of the program JSON fits in 64 bits
  (``MAX_INTEGER``): sizes, strides and scalars are int64 to torch.

Every string of the program JSON is checked by the field it sits in (``_check_string``); fields torch
keeps only as node metadata text (stack traces, module stacks) are checked for control characters only.
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
from typing import BinaryIO, Callable

import torch

#: The entries ``torch.export.save`` writes for one program named "model" with raw tensor payloads.
ARCHIVE_ENTRY = re.compile(
    r"models/model\.json|data/weights/weight_\d+|data/weights/model_weights_config\.json|data/constants/tensor_\d+"
    r"|data/constants/model_constants_config\.json|data/sample_inputs/model\.pt|archive_format|archive_version"
    r"|byteorder|\.data/version|\.data/serialization_id"
)
PROGRAM_JSON = "models/model.json"
PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": ("data/weights/", "weight_"),
                   "data/constants/model_constants_config.json": ("data/constants/", "tensor_")}

#: sympy and torch.utils._sympy functions a serialized size expression may call.
#: Integer arithmetic only: no powers or floats (a huge power is a denial of service; sizes are integers).
SYMPY_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Add", "Mul", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or",
    "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilDiv", "Identity",
})
SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "int_oo"})
#: The largest magnitude of an integer in a size expression, a guard or anywhere in the program JSON (int64).
MAX_INTEGER = 2**63
SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")
SYMBOL_ASSUMPTIONS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "nonzero",
    "zero", "even", "odd", "rational", "extended_real", "commutative",
})
#: What a guard may call: the size accessors of an input, and a few integer functions.
GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
GUARD_FUNCTIONS = frozenset({"Max", "Min", "Abs", "FloorDiv", "Mod", "PythonMod", "CeilToInt", "FloorToInt",
                             "TruncToInt", "IntTrueDiv", "Eq", "Ne"})
GUARD_KEY = re.compile(r"[A-Za-z_]\w{0,99}")
#: The symbolic-size operators torch serializes by module and name (torch._export.serde.serialize._SYM_OPS),
#: but ``pow`` and ``lshift``: a 64-bit exponent or shift would hang every run of the program.
SYMBOLIC_OPERATORS = frozenset({
    "_operator.add", "_operator.and_", "_operator.eq", "_operator.floordiv", "_operator.ge", "_operator.gt",
    "_operator.le", "_operator.lt", "_operator.mod", "_operator.mul", "_operator.ne",
    "_operator.neg", "_operator.or_", "_operator.pos", "_operator.rshift", "_operator.sub",
    "_operator.truediv", "math.trunc", "torch._sym_sqrt", "torch.sym_float", "torch.sym_int", "torch.sym_ite",
    "torch.sym_max", "torch.sym_min", "torch.sym_not",
})
OPERATOR_NAMESPACES = ("aten", "specontext")
#: The aten operators a program may call: every one the supported families' exported steps use (float32
#: and bf16, dense and sparse, resident and offloaded), and the dense elementwise, reduction, shape and
#: matrix operators models are made of. Not: sparse, quantized or nested tensor constructors and
#: ``_unsafe`` variants (they trust their indices: out-of-bounds writes), uninitialized allocations,
#: file and print operators, and anything mutating (checked by schema as well).
ALLOWED_ATEN = frozenset(f"aten::{name}" for name in """
    __and__ __or__ __xor__ _assert_scalar _assert_tensor_metadata _local_scalar_dense _softmax
    _to_copy abs acos add addcdiv addcmul addmm alias all amax amin any arange argmax argmin argsort asin
    atan baddbmm bitwise_and bitwise_not bitwise_or bitwise_xor bmm cat ceil chunk clamp clamp_max clamp_min
    clone contiguous cos cosh cumprod cumsum detach div dropout einsum elu embedding eq erf exp expand
    expand_as expm1 flatten floor floor_divide fmod full full_like gather ge gelu gt hardtanh index
    index_select isinf isnan item layer_norm le leaky_relu lerp lift_fresh_copy linalg_vector_norm linear
    log log1p log_softmax logical_and logical_not logical_or lt masked_fill matmul max maximum mean min minimum
    mm mul narrow native_layer_norm ne neg new_full new_ones new_zeros norm one_hot ones ones_like outer
    permute pow prod reciprocal relu remainder repeat repeat_interleave reshape rms_norm round rsqrt rsub
    scalar_tensor select sigmoid sign silu sin sinh slice softmax softplus sort split split_with_sizes sqrt
    square squeeze stack std sub sum sym_constrain_range_for_size sym_numel sym_size sym_storage_offset
    sym_stride t tanh to topk transpose tril triu type_as unbind unflatten unsqueeze var view view_as where
    zeros zeros_like
""".split())
#: The only operator arguments that may be strings: enumerations (and einsum's equation). Any other
#: string argument could be a path: ``aten::from_file(filename, shared=True)`` maps a file for writing.
STRING_ARGUMENTS = frozenset({("aten::gelu", "approximate"), ("aten::div", "rounding_mode"), ("aten::einsum", "equation")})
STRING_VALUE = re.compile(r"[A-Za-z0-9_.,>\- ]{0,100}")
OPERATOR_TARGET = re.compile(r"torch\.ops\.(\w+)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")
#: Control characters a program string may not hold (Python ends a comment line at "\r").
FORBIDDEN_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
MAX_EXPRESSION = 20_000


class UnsafeProgram(ValueError):
    """The archive holds something ``torch.export.load`` would unpickle, evaluate or call."""


def scan_program_archive(handle: BinaryIO) -> None:
    """Refuse (:class:`UnsafeProgram`) an archive that loading could run code from; see the module docstring.

    ``handle``: the archive opened for reading; the caller loads from the same handle afterwards."""
    handle.seek(0)
    if handle.read(4) != b"PK\x03\x04":
        raise UnsafeProgram("does not start with a zip entry (leading bytes would let two zip readers disagree)")
    handle.seek(0)
    try:
        reader = torch._C.PyTorchFileReader(handle)
        records = list(reader.get_all_records())
    except RuntimeError as error:
        raise UnsafeProgram(f"not a readable torch.export archive ({error})") from None
    _check_listings_agree(handle, reader, records)
    for name in records:
        if not ARCHIVE_ENTRY.fullmatch(name):
            raise UnsafeProgram(f"unexpected archive entry {name!r} (only one program's JSON, raw weights and "
                                "constants and version records are accepted: loading never unpickles)")
    if PROGRAM_JSON not in records:
        raise UnsafeProgram(f"no {PROGRAM_JSON}")
    sample_inputs = "data/sample_inputs/model.pt"
    if sample_inputs in records and len(reader.get_record(sample_inputs)):
        raise UnsafeProgram(f"{sample_inputs} holds pickled sample inputs; specontext artifacts store none, "
                            "and loading never unpickles")
    for config_name, (folder, prefix) in PAYLOAD_CONFIGS.items():
        if config_name in records:
            _check_payload_config(config_name, _json_record(reader, config_name), folder, prefix, set(records))
    check_program_json(_json_record(reader, PROGRAM_JSON))
    handle.seek(0)


def _check_listings_agree(handle: BinaryIO, reader, records: list[str]) -> None:
    """Python's zipfile (torch's legacy path) must see the entries torch's reader sees, at the same offsets."""
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as error:
        raise UnsafeProgram(f"not a readable zip archive ({error})") from None
    names = [info.filename.split("/", 1)[1] if "/" in info.filename else info.filename for info in infos]
    if len(set(names)) != len(names) or sorted(names) != sorted(records):
        raise UnsafeProgram("zip readers disagree: Python's zipfile and torch's reader list different entries")
    if hasattr(reader, "get_record_header_offset"):
        for info, name in zip(infos, names):
            if info.header_offset != reader.get_record_header_offset(name):
                raise UnsafeProgram(f"zip readers disagree on where {name!r} starts")


def _json_record(reader, name: str):
    try:
        return json.loads(reader.get_record(name))
    except (ValueError, RecursionError) as error:  # ValueError: also an integer of over 4,300 digits
        raise UnsafeProgram(f"{name} is not valid JSON ({error})") from None


def _check_payload_config(name: str, config, folder: str, prefix: str, records: set[str]) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsafeProgram(f"{name} is not a payload config")
    for key, entry in entries.items():
        path_name = entry.get("path_name") if isinstance(entry, dict) else None
        if (not isinstance(path_name, str) or entry.get("use_pickle") is not False
                or not re.fullmatch(re.escape(prefix) + r"\d+", path_name)):
            raise UnsafeProgram(f"{name}: {key!r} is stored as a pickle or an object, not raw tensor bytes; "
                                "loading never unpickles")
        if folder + path_name not in records:
            raise UnsafeProgram(f"{name}: {key!r} points at {folder + path_name}, which the archive lacks")


# -- the program's JSON ---------------------------------------------------------------------------------------
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
#: Module paths (``model.layers.0.mlp``): FX writes a non-identifier part as ``getattr(x, "part")``.
DOTTED_NAME = re.compile(r"([A-Za-z0-9_]{1,200}(\.[A-Za-z0-9_]{1,200}){0,63})?")
DOTTED_KEYS = frozenset({"parameter_name", "buffer_name", "fqn", "tensor_constant_name", "custom_obj_name",
                         "target", "weight_name"})
#: Node metadata torch keeps as text (``node.meta``), never as code: only control characters are refused.
FREE_TEXT_KEYS = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "custom"})
#: ``source_fn_stack`` metadata is resolved by attribute lookups from ``torch`` into live objects kept on
#: the nodes (``torch.os.system`` would do): a plain exported program has none, so none is accepted.
REFUSED_FIELDS = frozenset({"source_fn_stack"})
VERSION = re.compile(r"[\w.+-]{1,64}")
#: Argument kinds that carry subgraphs, operators or script objects: a plain program has none.
REFUSED_ARGUMENTS = frozenset({"as_graph", "as_operator", "as_custom_obj", "as_opaque_obj"})
SPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})
#: ``torch._export.serde.schema.Layout.Strided``: every tensor of a plain program is dense and strided
#: (sparse layouts reach kernels that trust their indices).
STRIDED_LAYOUT = 7
#: Arguments that must hold one value: dropout in training mode would draw from the global RNG.
FIXED_ARGUMENTS = {"torch.ops.aten.dropout.default": {"train": {"as_bool": False}}}


def check_program_json(program) -> None:
    """Refuse a serialized program holding anything torch would evaluate, execute, import or call beyond
    operators and size expressions (module docstring). Every string is held to what its field may hold:
    names are identifiers (FX pastes them into the Python it compiles), module paths dotted identifiers,
    targets operators, ``expr_str`` and guards a strict grammar, specs plain tuples/lists/dicts of
    identifier keys; metadata text only free of control characters."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise UnsafeProgram(f"{PROGRAM_JSON} is not a serialized ExportedProgram")
    _walk(program, None)


def _walk(value, key: str | None) -> None:
    stack: list[tuple[object, str | None]] = [(value, key)]
    while stack:
        item, key = stack.pop()
        if isinstance(item, dict):
            if "target" in item and "inputs" in item and "outputs" in item:
                _check_node(item)  # a node: its target is an operator, checked here
                item = {k: v for k, v in item.items() if k != "target"}
            for name, child in item.items():
                if not isinstance(name, str) or not (IDENTIFIER.fullmatch(name) or key == "range_constraints"
                                                     and SYMBOL_NAME.fullmatch(name)):
                    raise UnsafeProgram(f"field name {str(name)[:80]!r} is not an identifier")
                if name in REFUSED_ARGUMENTS:
                    raise UnsafeProgram(f"an argument of kind {name} (subgraphs, operators and script objects are "
                                        "not part of a plain program)")
                stack.append((child, name))
        elif isinstance(item, list):
            stack.extend((child, key) for child in item)
        elif isinstance(item, str):
            _check_string(item, key)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INTEGER:
            raise UnsafeProgram(f"{key}: the integer {_short(item)} is beyond the 64-bit sizes and scalars torch "
                                f"takes; accepted: at most 2**63 in magnitude")
        elif key in ("layout", "as_layout") and item != STRIDED_LAYOUT:
            raise UnsafeProgram(f"a tensor of layout {item!r}: only dense strided tensors are accepted")


def _check_node(node: dict) -> None:
    check_target(node.get("target"))
    required = FIXED_ARGUMENTS.get(node["target"], {})
    arguments = {entry.get("name"): entry.get("arg") for entry in node["inputs"] if isinstance(entry, dict)}
    for name, value in required.items():
        if arguments.get(name, value) != value:
            raise UnsafeProgram(f"{node['target']}: {name} must be {value}")


def _check_string(text: str, key: str | None) -> None:
    if FORBIDDEN_CHARACTERS.search(text):
        raise UnsafeProgram(f"{key}: a string holds a control character: {text[:80]!r}")
    if key in FREE_TEXT_KEYS:
        return
    if key in REFUSED_FIELDS:
        raise UnsafeProgram(f"{key} metadata (torch resolves it into live objects)")
    if key in ("as_string", "as_strings"):  # an operator's enumeration argument (check_target allows which)
        if not STRING_VALUE.fullmatch(text):
            raise UnsafeProgram(f"string argument {text[:80]!r} is not an enumeration value")
    elif key == "expr_str":
        _check_expression(text, _check_sympy_node, "size expression")
    elif key == "guards_code":
        _check_expression(text, _check_guard_node, "guard")
    elif key in ("in_spec", "out_spec"):
        _check_spec(text, key)
    elif key == "torch_version":
        if not VERSION.fullmatch(text):
            raise UnsafeProgram(f"torch_version {text[:80]!r} is not a version")
    elif key in DOTTED_KEYS:
        if not DOTTED_NAME.fullmatch(text) or any(part.startswith("__") for part in text.split(".")):
            raise UnsafeProgram(f"{key} {text[:80]!r} is not a dotted name of modules and attributes")
    elif not IDENTIFIER.fullmatch(text):
        raise UnsafeProgram(f"{key} {text[:80]!r} is not an identifier")


def _check_spec(text: str, key: str) -> None:
    """A pytree spec: only tuples, lists, dicts with identifier keys, and leaves (torch's spec decoder
    imports modules named in other node types and contexts)."""
    try:
        protocol, root = json.loads(text)
    except (ValueError, TypeError, RecursionError) as error:
        raise UnsafeProgram(f"{key} is not a pytree spec ({error})") from None
    if not isinstance(protocol, int):
        raise UnsafeProgram(f"{key} is not a pytree spec")
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"} or depth > 8:
            raise UnsafeProgram(f"{key}: a spec node is not a plain tuple, list, dict or leaf")
        kind, context, children = node["type"], node["context"], node["children_spec"]
        if kind not in SPEC_TYPES or not isinstance(children, list):
            raise UnsafeProgram(f"{key}: a spec node of type {str(kind)[:80]!r}; accepted: tuples, lists, dicts, leaves")
        if kind is None and (context is not None or children):
            raise UnsafeProgram(f"{key}: a leaf with a context or children")
        if kind in ("builtins.tuple", "builtins.list") and context != "null":
            raise UnsafeProgram(f"{key}: a {kind} with a context")
        if kind == "builtins.dict":
            try:
                names = json.loads(context)
            except (ValueError, TypeError):
                names = None
            if (not isinstance(names, list) or len(names) != len(children)
                    or not all(isinstance(n, str) and IDENTIFIER.fullmatch(n) for n in names)):
                raise UnsafeProgram(f"{key}: a dict whose keys are not identifiers")
        stack.extend((child, depth + 1) for child in children)


def check_target(target) -> None:
    """A node target must be a functional aten/prims/specontext operator overload without path-like
    string arguments, or a symbolic-size operator."""
    if not isinstance(target, str):
        raise UnsafeProgram(f"node target {target!r} is not a name")
    if target in SYMBOLIC_OPERATORS:
        return
    match = OPERATOR_TARGET.fullmatch(target)
    operator = None
    if match and match.group(1) in OPERATOR_NAMESPACES:
        namespace, name, overload = match.groups()
        operator = getattr(getattr(getattr(torch.ops, namespace), name, None), overload, None)
    if not isinstance(operator, torch._ops.OpOverload):
        raise UnsafeProgram(f"node target {target!r} is not an operator of {', '.join(OPERATOR_NAMESPACES)} nor a "
                            "symbolic-size operator: a loaded program calls its targets")
    schema = operator._schema
    if namespace == "aten" and schema.name not in ALLOWED_ATEN:
        raise UnsafeProgram(f"node target {target!r} is not an operator an exported model step uses (sparse, "
                            "quantized and nested constructors, unsafe variants, uninitialized memory, files "
                            "and printing are refused)")
    if schema.is_mutable:
        raise UnsafeProgram(f"node target {target!r} writes into its arguments; an exported step is functional")
    for argument in schema.arguments:
        if "str" in str(argument.type) and (schema.name, argument.name) not in STRING_ARGUMENTS:
            raise UnsafeProgram(f"node target {target!r} takes the string argument {argument.name!r} (a path, "
                                "for all this check knows); only enumeration arguments may be strings")


def _check_expression(text, check_node: Callable[[ast.AST, set[int]], None], what: str) -> None:
    """Parse ``text`` as one Python expression and check every node; ``ast.walk`` visits a node before its
    children, so a node can vouch (in ``vouched``) for the string constants it takes."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION:
        raise UnsafeProgram(f"{what} {str(text)[:80]!r} is not a string of at most {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text, mode="eval")
        vouched: set[int] = set()
        for node in ast.walk(tree):
            check_node(node, vouched)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise UnsafeProgram(f"{what} {text[:200]!r} is refused: {error}") from None


def _check_sympy_node(node: ast.AST, vouched: set[int]) -> None:
    """A sympy constructor expression: calls of known functions on numbers, and Symbol('s0', integer=True)."""
    if isinstance(node, (ast.Expression, ast.keyword, ast.Load, ast.UnaryOp, ast.USub, ast.UAdd)):
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) <= MAX_INTEGER:
        return
    if isinstance(node, ast.Constant) and id(node) in vouched:
        return  # a string only as a Symbol's name
    if isinstance(node, ast.Name) and (node.id in SYMPY_CONSTANTS or node.id in SYMPY_FUNCTIONS):
        return
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SYMPY_FUNCTIONS:
        strings = [arg for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        if node.func.id == "Symbol":
            if (len(node.args) != 1 or len(strings) != 1 or not SYMBOL_NAME.fullmatch(strings[0].value)
                    or any(k.arg not in SYMBOL_ASSUMPTIONS or not isinstance(k.value, ast.Constant)
                           or not isinstance(k.value.value, bool) for k in node.keywords)):
                raise ValueError("Symbol takes one size-symbol name and boolean assumptions")
            vouched.add(id(strings[0]))
            return
        if strings or node.keywords:
            raise ValueError(f"{node.func.id} takes expressions and numbers only")
        return
    raise ValueError(f"{type(node).__name__} is not part of a size expression")


def _short(value: int) -> str:
    """An integer for a message: its digits, or its size when they would fill the message."""
    return str(value) if abs(value) < 10**30 else f"of {value.bit_length()} bits"


#: What a guard may be made of (ast node types). No ``Pow`` (nor shifts): ``10**10**10`` computes for ever.
GUARD_NODES = (ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Load, ast.And, ast.Or, ast.Not,
               ast.USub, ast.UAdd, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Eq, ast.NotEq, ast.Lt,
               ast.LtE, ast.Gt, ast.GtE, ast.Subscript, ast.Attribute)


def _check_guard_node(node: ast.AST, vouched: set[int]) -> None:
    """A guard: comparisons and integer arithmetic (``+ - * // %``, no powers) over ``L['name'].size()[i]``
    and numbers of at most ``MAX_INTEGER`` in magnitude (torch writes equalities of input sizes)."""
    if isinstance(node, ast.Pow):
        raise ValueError("powers are not accepted in a guard (accepted: comparisons, + - * // %, size accessors, "
                         "integers of at most 2**63)")
    if isinstance(node, GUARD_NODES):
        if isinstance(node, ast.Attribute) and node.attr not in GUARD_METHODS:
            raise ValueError(f"attribute {node.attr!r}")
        if isinstance(node, ast.Subscript):
            key = node.slice
            if not isinstance(key, ast.Constant) or not (
                    (isinstance(key.value, int) and not isinstance(key.value, bool))
                    or (isinstance(key.value, str) and GUARD_KEY.fullmatch(key.value))):
                raise ValueError("subscripts are integers or input names")
            vouched.add(id(key))
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) > MAX_INTEGER:
        raise ValueError(f"the integer {_short(node.value)} is beyond the accepted magnitude of 2**63")
    if isinstance(node, ast.Constant) and (isinstance(node.value, (int, float)) or id(node) in vouched):
        return  # a string only as an input name (torch pastes a guard into a string literal of its message)
    if isinstance(node, ast.Name) and (node.id == "L" or node.id in GUARD_FUNCTIONS):
        return
    if isinstance(node, ast.Call):
        func = node.func
        if node.keywords or not (
                (isinstance(func, ast.Attribute) and func.attr in GUARD_METHODS and not node.args)
                or (isinstance(func, ast.Name) and func.id in GUARD_FUNCTIONS)):
            raise ValueError("calls are size accessors and integer functions")
        return
    raise ValueError(f"{type(node).__name__} is not part of a size guard")
