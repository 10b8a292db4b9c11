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
  must be a comparison of input sizes (``L['input_ids'].size()[1] == L['position_ids'].size()[1]``).
* Node targets: any callable reachable by attributes from ``torch``, ``operator`` or ``math`` is accepted
  as a node target and called when the program runs, so a target must be an operator overload of the
  ``aten``, ``prims`` or ``specontext`` namespace, or one of the symbolic-size operators.
* Generated code: FX writes node stack traces into the Python source it compiles; a carriage return
  would end the comment, so no string in the program may hold control characters other than newline
  and tab.
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
SYMPY_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity",
})
SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "int_oo", "nan", "zoo", "S"})
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
#: The symbolic-size operators torch serializes by module and name (torch._export.serde.serialize._SYM_OPS).
SYMBOLIC_OPERATORS = frozenset({
    "_operator.add", "_operator.and_", "_operator.eq", "_operator.floordiv", "_operator.ge", "_operator.gt",
    "_operator.le", "_operator.lshift", "_operator.lt", "_operator.mod", "_operator.mul", "_operator.ne",
    "_operator.neg", "_operator.or_", "_operator.pos", "_operator.pow", "_operator.rshift", "_operator.sub",
    "_operator.truediv", "math.trunc", "torch._sym_sqrt", "torch.sym_float", "torch.sym_int", "torch.sym_ite",
    "torch.sym_max", "torch.sym_min", "torch.sym_not",
})
OPERATOR_NAMESPACES = ("aten", "prims", "specontext")
OPERATOR_TARGET = re.compile(r"torch\.ops\.(\w+)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)")
#: Control characters a program string may not hold (Python ends a comment line at "\r").
FORBIDDEN_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
MAX_EXPRESSION = 20_000


class UnsafeProgram(ValueError):
    """The archive holds something ``torch.export.load`` would unpickle, evaluate or call."""


def check_program_archive(handle: BinaryIO) -> None:
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
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
def check_program_json(program) -> None:
    """Refuse a serialized program whose strings torch would evaluate or call unsafely (module docstring)."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise UnsafeProgram(f"{PROGRAM_JSON} is not a serialized ExportedProgram")
    _walk(program)
    ranges = program.get("range_constraints") or {}
    if not isinstance(ranges, dict):
        raise UnsafeProgram("range_constraints is not a mapping")
    for symbol in ranges:
        if not SYMBOL_NAME.fullmatch(symbol):
            raise UnsafeProgram(f"range constraint for {symbol!r}, which is not a size symbol name")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise UnsafeProgram("guards_code is not a list")
    for guard in guards:
        _check_expression(guard, _check_guard_node, "guard")


def _walk(value) -> None:
    """Every string: no control characters; every ``expr_str``: a size expression; every node: a safe target."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if FORBIDDEN_CHARACTERS.search(item):
                raise UnsafeProgram(f"a string holds a control character: {item[:80]!r}")
        elif isinstance(item, dict):
            if "expr_str" in item:
                _check_expression(item["expr_str"], _check_sympy_node, "size expression")
            if "target" in item and "inputs" in item and "outputs" in item:
                check_target(item["target"])
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_target(target) -> None:
    """A node target must be an aten/prims/specontext operator overload or a symbolic-size operator."""
    if not isinstance(target, str):
        raise UnsafeProgram(f"node target {target!r} is not a name")
    if target in SYMBOLIC_OPERATORS:
        return
    match = OPERATOR_TARGET.fullmatch(target)
    if match and match.group(1) in OPERATOR_NAMESPACES:
        namespace, name, overload = match.groups()
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if isinstance(getattr(packet, overload, None), torch._ops.OpOverload):
            return
    raise UnsafeProgram(f"node target {target!r} is not an operator of {', '.join(OPERATOR_NAMESPACES)} nor a "
                        "symbolic-size operator: a loaded program calls its targets")


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
    if isinstance(node, ast.Constant) and (isinstance(node.value, (int, float, bool)) or id(node) in vouched):
        return  # a string only as a Symbol's name or a Float's digits
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
        if node.func.id == "Float":
            if strings and not all(re.fullmatch(r"-?[\d.]+(e-?\d+)?", s.value) for s in strings):
                raise ValueError("Float takes digits")
            if any(k.arg != "precision" for k in node.keywords):
                raise ValueError("Float takes only precision=")
            vouched.update(id(s) for s in strings)
            return
        if strings or node.keywords:
            raise ValueError(f"{node.func.id} takes expressions and numbers only")
        return
    raise ValueError(f"{type(node).__name__} is not part of a size expression")


def _check_guard_node(node: ast.AST, vouched: set[int]) -> None:
    """A guard: comparisons and integer arithmetic over ``L['name'].size()[i]`` and numbers."""
    allowed = (ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Load, ast.And, ast.Or,
               ast.Not, ast.USub, ast.UAdd, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Pow, ast.Eq,
               ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Subscript, ast.Attribute)
    if isinstance(node, allowed):
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
