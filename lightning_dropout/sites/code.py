"""Which drop rates a module class's own code uses, read statically from its source.

Most dropout in real models is not a dropout module: transformers passes
``dropout=0.0 if not self.training else self.attention_dropout`` to its attention
functions, timm calls ``F.dropout(x, p=self.drop_rate, training=self.training)`` in its
heads, BERT and timm's ViT hand ``self.dropout.p`` to ``scaled_dot_product_attention``.
Reading each class's methods (their syntax tree, never executing them) finds these calls,
the expression each passes as its rate, and the attributes of ``self`` that expression
reads. No input is needed and nothing runs, so the reading is done once per class.

What is recognised as a dropping call (by the called name, so ``F.dropout``,
``nn.functional.dropout`` and ``torch.nn.functional.dropout`` alike):

- the dropout functions (:data:`DROP_FUNCTIONS`), rate = argument 1 or ``p=`` / ``drop_prob=``;
- ``scaled_dot_product_attention``, rate = argument 4 or ``dropout_p=``;
- any other call given a ``dropout=`` or ``dropout_p=`` keyword (transformers' attention
  interfaces, flash attention).

A rate held in a local variable (``dropout_p = self.p if self.training else 0.0``) is
followed to its assignments in the same method. A call through a name the method binds
itself (an argument, a loop variable, ``dropout = self.lora_dropout[name]`` in peft's LoRA
layers) calls what that name holds, a module most often: it counts as a dropout function
only when the name is assigned one (``dropout = F.dropout``); given a ``dropout=`` keyword
it is an attention interface as above. Code outside the class (a free
function the class calls with a rate that is not an argument) is not read.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from types import CodeType, FunctionType

#: Dropout functions by name, with the site kind each one drops.
DROP_FUNCTIONS = {
    "dropout": "dropout",
    "dropout1d": "channel",
    "dropout2d": "channel",
    "dropout3d": "channel",
    "alpha_dropout": "alpha",
    "feature_alpha_dropout": "alpha",
    "drop_path": "drop_path",
    "stochastic_depth": "drop_path",
    "drop_block_2d": "drop_block",
    "drop_block_fast_2d": "drop_block",
}
_RATE_KEYWORDS = ("p", "drop_prob")
_ATTENTION_FUNCTION = "scaled_dot_product_attention"
_ATTENTION_RATE_POSITION = 4
_ATTENTION_KEYWORDS = ("dropout", "dropout_p")
# Construction and printing read rates without dropping.
_SKIPPED_METHODS = frozenset({"__init__", "__repr__", "extra_repr", "reset_parameters"})
# Libraries whose classes are known here by type (torch's, this package's) or hold no
# model code (Lightning, torchmetrics).
_SKIPPED_LIBRARIES = ("torch.", "lightning.", "lightning_fabric.", "pytorch_lightning.", "torchmetrics.")


@dataclass(frozen=True)
class RateUse:
    """One dropping call in a class's code.

    Attributes:
        function: the called name (``"dropout"``, ``"scaled_dot_product_attention"``, ...).
        kind: the site kind it drops (see :data:`~lightning_dropout.sites.SITE_KINDS`).
        chains: the attribute paths of ``self`` its rate expression reads, ``("training",)``
            left out: ``(("attention_dropout",),)`` or ``(("attn_drop", "p"),)``.
        written_p: the rate when the code writes it as a number (or leaves the function's
            default), else None.
        line: the line of the call in its file.
    """

    function: str
    kind: str
    chains: tuple[tuple[str, ...], ...]
    written_p: float | None
    line: int


@dataclass(frozen=True)
class ClassCode:
    """What a class's code does with drop rates.

    Attributes:
        uses: every dropping call in its methods (and its bases' methods).
        drop_names: the names containing ``drop`` that its methods use (attributes they
            read among them, such as ``layerdrop``).
        reads_training: whether its methods read a ``training`` attribute.
    """

    uses: tuple[RateUse, ...] = ()
    drop_names: frozenset[str] = frozenset()
    reads_training: bool = False


_CACHE: weakref.WeakKeyDictionary[type, ClassCode] = weakref.WeakKeyDictionary()


def class_code(cls: type) -> ClassCode:
    """The drop rates the methods of ``cls`` and of its bases use (cached per class).

    Bases from torch, Lightning, torchmetrics and this package are not read: their
    dropout is known by type.

    Example:
        >>> class Head(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        >>> use = class_code(Head).uses[0]
        >>> use.function, use.kind, use.chains, class_code(Head).reads_training
        ('dropout', 'dropout', (('drop_rate',),), True)
    """
    cached = _CACHE.get(cls)
    if cached is None:
        uses: list[RateUse] = []
        reads: set[str] = set()
        for klass in cls.__mro__:
            if _is_skipped(klass):
                continue
            for function in _methods(klass):
                names = _names(function.__code__)
                reads.update(names)
                # Parsing is the expensive part: only methods that mention dropping.
                if any("drop" in name or name == _ATTENTION_FUNCTION for name in names):
                    tree = _parse(function)
                    if tree is not None:
                        _read_method(tree, function.__code__.co_firstlineno - 1, uses)
        drop_names = frozenset(name for name in reads if "drop" in name.lower())
        cached = _CACHE[cls] = ClassCode(tuple(uses), drop_names, "training" in reads)
    return cached


def _names(code: CodeType) -> set[str]:
    """The attribute and global names ``code`` (and the code nested in it) uses, and its
    string constants (keyword argument names among them)."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= _names(constant)
        elif isinstance(constant, str):
            names.add(constant)
        elif isinstance(constant, tuple):
            names.update(c for c in constant if isinstance(c, str))
    return names


def _is_skipped(klass: type) -> bool:
    module = getattr(klass, "__module__", "") or ""
    if klass is object or module == "builtins" or module.startswith(_SKIPPED_LIBRARIES):
        return True
    # This package's own classes (the mixin, the layers) drop only by type; classes a user
    # defines in a doctest or a notebook cell may carry a package module name too.
    own = module == "lightning_dropout" or module.startswith("lightning_dropout.")
    return own and _follow_name(sys.modules.get(module), klass.__qualname__) is klass


def _follow_name(root: object, qualname: str) -> object:
    for part in qualname.split("."):
        root = getattr(root, part, None)
    return root


def _methods(klass: type) -> Iterator[FunctionType]:
    for name, member in vars(klass).items():
        if name in _SKIPPED_METHODS:
            continue
        if isinstance(member, (staticmethod, classmethod)):
            continue
        if isinstance(member, property):
            member = member.fget
        function = inspect.unwrap(member) if callable(member) else None
        if inspect.isfunction(function):
            yield function


def _parse(function: FunctionType) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None  # compiled, generated or exec'd code: nothing to read
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _read_method(
    method: ast.FunctionDef | ast.AsyncFunctionDef, line_offset: int, uses: list[RateUse]
) -> None:
    arguments = method.args.posonlyargs + method.args.args
    if not arguments:
        return
    self_name = arguments[0].arg
    assignments = _local_assignments(method)
    local_names = _bound_names(method)
    for node in ast.walk(method):
        if not isinstance(node, ast.Call) or _calls_own_member(node, self_name):
            continue
        if _names_drop_function(node.func) and _calls_local_object(node, local_names, assignments):
            continue
        found = _rate_argument(node)
        if found is None:
            continue
        function, kind, rate = found
        expressions = _resolve(rate, assignments) if rate is not None else []
        chains = tuple(
            dict.fromkeys(
                chain
                for expression in expressions
                for chain in _self_chains(expression, self_name)
                if chain[0] != "training"
            )
        )
        uses.append(RateUse(function, kind, chains, _written_p(rate, expressions), node.lineno + line_offset))


def _calls_own_member(call: ast.Call, self_name: str) -> bool:
    """``self.dropout(x)``: a submodule or method call, not a dropout function."""
    func = call.func
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == self_name


def _bound_names(method: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The names ``method`` binds itself: its arguments and every name it stores to."""
    arguments = method.args
    names = {a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)}
    names.update(a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None)
    names.update(
        node.id for node in ast.walk(method) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    )
    return names


def _calls_local_object(call: ast.Call, local_names: set[str], assigned: dict[str, list[ast.expr]]) -> bool:
    """``dropout(x)`` where ``dropout`` is bound in the method to something other than a
    dropout function (``dropout = self.lora_dropout[name]``): a module or a callable
    argument, not a call of the dropout function of that name."""
    if not isinstance(call.func, ast.Name) or call.func.id not in local_names:
        return False
    values = assigned.get(call.func.id, [])
    return not values or not all(_names_drop_function(value) for value in values)


def _names_drop_function(expression: ast.expr) -> bool:
    """``F.dropout``, ``torch.nn.functional.dropout2d``, ``drop_path``: a dropping function."""
    name = expression.attr if isinstance(expression, ast.Attribute) else getattr(expression, "id", None)
    return name in DROP_FUNCTIONS or name == _ATTENTION_FUNCTION


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    if isinstance(call.func, ast.Name):
        return call.func.id
    return None


def _rate_argument(call: ast.Call) -> tuple[str, str, ast.expr | None] | None:
    """``(function, kind, rate expression)`` if ``call`` drops; the expression is None for a
    dropout function called without a rate (its default, 0.5, applies)."""
    name = _called_name(call)
    if name is None:
        return None
    keywords = {keyword.arg: keyword.value for keyword in call.keywords if keyword.arg}
    if name in DROP_FUNCTIONS:
        rate = next((keywords[k] for k in _RATE_KEYWORDS if k in keywords), None)
        if rate is None and len(call.args) > 1:
            rate = call.args[1]
        return name, DROP_FUNCTIONS[name], rate
    if name == _ATTENTION_FUNCTION:
        rate = keywords.get("dropout_p")
        if rate is None and len(call.args) > _ATTENTION_RATE_POSITION:
            rate = call.args[_ATTENTION_RATE_POSITION]
        return (name, "attention", rate) if rate is not None else None
    rate = next((keywords[k] for k in _ATTENTION_KEYWORDS if k in keywords), None)
    if rate is None:
        return None
    kind = "attention" if "att" in name.lower() else "dropout"
    return name, kind, rate


def _local_assignments(method: ast.AST) -> dict[str, list[ast.expr]]:
    assigned: dict[str, list[ast.expr]] = {}
    for node in ast.walk(method):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            assigned.setdefault(node.target.id, []).append(node.value)
    return assigned


def _resolve(expression: ast.expr, assigned: dict[str, list[ast.expr]], depth: int = 2) -> list[ast.expr]:
    """``expression``, or the values assigned to it when it is a local variable."""
    if depth and isinstance(expression, ast.Name) and expression.id in assigned:
        return [e for value in assigned[expression.id] for e in _resolve(value, assigned, depth - 1)]
    return [expression]


def _self_chains(expression: ast.expr, self_name: str) -> Iterator[tuple[str, ...]]:
    """The longest attribute paths rooted at ``self`` in ``expression``."""
    if isinstance(expression, ast.Attribute):
        path: list[str] = []
        node: ast.expr = expression
        while isinstance(node, ast.Attribute):
            path.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == self_name:
            yield tuple(reversed(path))
            return
    for child in ast.iter_child_nodes(expression):
        if isinstance(child, ast.expr):
            yield from _self_chains(child, self_name)


def _written_p(rate: ast.expr | None, expressions: list[ast.expr]) -> float | None:
    if rate is None:
        return 0.5  # the dropout functions' default
    numbers = [e.value for e in expressions if isinstance(e, ast.Constant)]
    if len(numbers) == len(expressions) == 1 and isinstance(numbers[0], (int, float)):
        return float(numbers[0])
    return None


__all__ = ["DROP_FUNCTIONS", "ClassCode", "RateUse", "class_code"]
