"""Recipe YAML read strictly, so every problem is one line naming file:line (or the override), never a hang: PyYAML's
safe loader keeps the last of two equal keys, expands aliases without bound (a 450-byte "billion laughs" recipe walks
10⁹ values) and builds dates, sets and bytes from tags; `RecipeLoader` refuses all three and keeps dates as text.
Values then take `${VAR}` from the environment (`expand_env`)."""

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from .text import first_line, printable

MAX_VALUES = 100_000  # a recipe holds hundreds; a 64 KB file without aliases cannot reach this
MAX_DEPTH = 50  # a recipe is 2-4 levels deep; every later step that walks values recurses (Python stops near 1,000)
PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map",
                                                        "timestamp", "merge")}  # the last two: implicit ones


class RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: 6x faster, caps nesting depth
    """SafeLoader without duplicate keys, unbounded or cyclic aliases, or non-JSON tags; dates stay text."""

    def construct_document(self, node):
        _walk(node, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        first: dict[str, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in first:
                    raise ConstructorError(None, None, f"duplicate key '{key.value}', first at line "
                                           f"{first[key.value]}; keep one", key.start_mark)
                first[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


class RecipeError(ValueError):  # this module's errors, as it is the one every other imports
    """A mistake the user can fix in the recipe or on the command line; printed as one line."""


class KeyProblem(ValueError):
    """A wrong key or value; `config` adds the file and line of `dotted` and raises it as a RecipeError."""

    def __init__(self, dotted: str, message: str, candidates: list[str] = ()) -> None:
        self.dotted, self.candidates = dotted, list(candidates)
        super().__init__(message)


def place(where: dict[str, str], dotted: str) -> str | None:
    """Where `dotted` or the nearest key above it (`data.path` for `data.path[0].source`) was set."""
    dotted = dotted.partition("[")[0]
    while dotted and dotted not in where:
        dotted = dotted.rpartition(".")[0]
    return where.get(dotted)


def _walk(node, sizes: dict[int, tuple[int, int]], open_: set[int], depth: int = 0) -> tuple[int, int]:
    """(values `node` expands to: an alias counts each time, levels below it); raise past MAX_VALUES or MAX_DEPTH, on
    a cycle or a tag."""
    if id(node) not in sizes and depth > MAX_DEPTH or depth + sizes.get(id(node), (0, 0))[1] > MAX_DEPTH:
        raise ConstructorError(None, None, f"values nested more than {MAX_DEPTH} levels deep; a recipe is a few "
                               "levels deep", node.start_mark)
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ConstructorError(None, None, "an alias refers to a value that contains it", node.start_mark)
    if node.tag not in PLAIN_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise ConstructorError(None, None, f"the tag {tag} is not allowed in a recipe; remove it", node.start_mark)
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else ())
    total, height = 1, 0
    for child in children:
        size, below = _walk(child, sizes, open_, depth + 1)
        total, height = total + size, max(height, below + 1)
        if total > MAX_VALUES:
            raise ConstructorError(None, None, f"aliases expand to more than {MAX_VALUES:,} values; write the "
                                   "values out", node.start_mark)
    open_.discard(id(node))
    sizes[id(node)] = total, height
    return total, height


def read_recipe(path: Path) -> tuple[Any, dict[str, str]]:
    """(the recipe's data, `path:line` of every `section` and `section.key`); RecipeError for any problem."""
    if path.exists() and not path.is_file():  # a directory, a pipe (`/dev/stdin`, `<(…)`): read once, then gone
        raise RecipeError(f"{path}: not a regular file; save the recipe to a .yaml file (the command that continues "
                          "a run names it again)")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass a path such as recipes/tiny.yaml")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not valid UTF-8; save the recipe as UTF-8") from None
    raw, root = parse(text, str(path))
    where = {}
    for knode, vnode in root.value if isinstance(root, yaml.MappingNode) else ():
        where[knode.value] = f"{path}:{knode.start_mark.line + 1}"
        for k2, _ in vnode.value if isinstance(vnode, yaml.MappingNode) else ():
            where[f"{knode.value}.{k2.value}"] = f"{path}:{k2.start_mark.line + 1}"
    for dotted, number in leaves(raw):
        if problem := _out_of_range(number):
            raise RecipeError(f"{place(where, dotted) or path}: {dotted} must be {problem}, got {number!r}")
    return raw or {}, where


def parse(text: str, where: str) -> Any:
    """(data, root node) of YAML `text`; RecipeError `where[:line]: not valid YAML (…)` for any problem."""
    try:
        loader = RecipeLoader(text)  # in the try: libyaml refuses a lone surrogate here; its dispose() is a no-op
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark and where != "command line" else where
        raise RecipeError(f"{at}: not valid YAML ({first_line(getattr(exc, 'problem', None) or exc)})") from None
    except UnicodeError:  # a lone surrogate (from a non-UTF-8 command line)
        raise RecipeError(f"{where}: not valid Unicode (a lone surrogate); write it as UTF-8") from None
    except RecursionError:
        raise RecipeError(f"{where}: not valid YAML (nested too deeply); a recipe is a few levels deep") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a tag on a value it cannot type: `!!float false`
        raise RecipeError(f"{where}: not valid YAML ({first_line(exc)})") from None


def value(text: str, item: str) -> Any:
    """An override's or flag's value, typed like YAML; RecipeError naming the override."""
    item = printable(item)  # one line: a newline in it shown as \n
    try:
        data, node = parse(text, "command line")
    except RecipeError as exc:
        reason = str(exc).removeprefix("command line: ")
        raise RecipeError(f"command line: '{item}': {reason}; quote the value if it is text") from None
    if (end := node.end_mark.index if node else 0) < len(text.rstrip()):  # the rest: a ` #` comment, a `...` end
        why = "'#' there as the start of a comment" if "#" in text[end:] else f"only {text[:end].strip()!r} of it"
        raise RecipeError(f"command line: '{item}': YAML reads {why}; quote the value if it is text")
    for dotted, number in leaves(data, item.partition("=")[0]):
        if problem := _out_of_range(number):
            raise RecipeError(f"command line: {dotted} must be {problem}, got {number!r}")
    return data


def leaves(data: Any, dotted: str = ""):
    """(dotted key, value) of every value in `data` that is not a mapping or list (`data.path[0].weight`)."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from leaves(value, f"{dotted}.{key}" if dotted else str(key))
    elif isinstance(data, (list, tuple)):
        for n, value in enumerate(data):
            yield from leaves(value, f"{dotted}[{n}]")
    else:
        yield dotted, data


def _out_of_range(value: Any) -> str | None:
    """What a NaN, infinite or past-64-bit number must be (upstream takes NaN and inf silently; a huge int fails
    deep in torch), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    return "a number within 64 bits" if isinstance(value, int) and not -(2**63) < value < 2**63 else None


def expand_env(value: Any, dotted: str) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` (the default also when VAR is empty, as in the shell) in a string value,
    inside lists and mappings too, so one recipe serves several machines; a leading `~` in a path key's value."""
    if isinstance(value, list):  # data files: paths or {path, source, weight}; nesting is capped by MAX_DEPTH
        return [expand_env(item, dotted) for item in value]
    if isinstance(value, dict):  # `chat_template_kwargs: {dirs: ["${D}"]}` too
        return {key: expand_env(item, f"{dotted}.{key}") for key, item in value.items()}
    if not isinstance(value, str):
        return value
    value = _substitute(value, dotted)
    return os.path.expanduser(value) if {dotted, dotted.removesuffix(".path")} & PATH_KEYS else value


def _substitute(text: str, dotted: str) -> str:
    """`text` with each `${VAR}` or `${VAR:-default}` replaced; a default may hold references (`${A:-${B}/x}`),
    expanded only where it is used, as in the shell; a `${` not closed, or not naming a variable, stays as written."""
    out, start = "", 0
    while (opening := text.find("${", start)) >= 0:
        depth, end = 0, opening
        while end < len(text) and (depth := depth + text.startswith("${", end) - (text[end] == "}")):
            end += 1
        reference = re.fullmatch(r"\$\{(\w+)(?::-(.*))?\}", text[opening:end + 1], flags=re.S)
        out, start = out + text[start:opening], end + 1
        if reference is None:
            out += text[opening:end + 1]
        elif (var := reference[1]) in os.environ and (os.environ[var] or reference[2] is None):
            out += os.environ[var]
        elif reference[2] is not None:
            out += _substitute(reference[2], dotted)
        else:
            raise KeyProblem(dotted, f"{dotted} uses ${{{var}}} but {var} is not set; export it or write "
                             f"${{{var}:-default}}")
    return out + text[start:]


PATH_KEYS = {"model.name_or_path", "data.path", "data.eval_path", "data.chat_template", "output.dir",
             "output.checkpoint_dir"}  # a leading `~` in these is the home directory
