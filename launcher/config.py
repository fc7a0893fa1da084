"""The strict loader: typed dataclasses from YAML mappings and dotted ``key=value`` overrides.

Every key is checked: an unknown key or a value of the wrong type is a ``ConfigError``
naming the key and what it allows. ``to_dict``/``dump_yaml`` give the plain form back. The
experiment assembled from these pieces is in ``launcher/experiment.py``; the cluster
profiles and sweeps use the same loader.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from launcher.errors import ConfigError

# ----------------------------------------------------------------------------- loading


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not the last one wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is not None and "(line " not in problem:
        problem += f" (line {mark.line + 1}, column {mark.column + 1})"
    return problem


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping; missing, empty, malformed or with a key twice is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist; `launch experiments` lists the shipped ones")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment file {path} is not valid YAML: {yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"experiment file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
            f"(an experiment file is YAML text, not a binary or another encoding)"
        ) from None
    if data is None:
        raise ConfigError(
            f"experiment file {path} is empty; give at least the keys that differ from the defaults "
            f"(or pass no --experiment to use the shipped one)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. optim.blr=1e-4)")
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys and values of the wrong type.

    ``prefix`` names the mapping in messages (``method`` -> ``method.pool``); empty for a whole file.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'the file'} must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(raw) - fields
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(dotted(prefix, k) for k in sorted(unknown))}; "
            f"{prefix or 'it'} allows: {', '.join(sorted(fields))}"
        )
    kwargs = {key: coerce(hints[key], value, dotted(prefix, key)) for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # TypeError: a required field is missing
        raise ConfigError(f"invalid {prefix}: {e}" if prefix else f"invalid: {e}") from None


def dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; widen int to float and list to tuple."""
    if tp is Any:  # a section passed on as it is (a study's experiment), checked by its own loader
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is dict:
        key_type, value_type = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {coerce(key_type, k, key): coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        item_type = get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {item_type.__name__}, got {value!r}")
        return tuple(coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), key)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            number = float(value)
        except ValueError:
            pass
        else:
            return _finite(number, key)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key} must be a {name}, got {value!r} ({type(value).__name__})")


def _finite(value: float, key: str) -> float:
    """No setting of this project means anything at NaN or an infinity: refuse them where they are typed."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}; give it a real value (e.g. {key}=1e-4)")
    return value


# ----------------------------------------------------------------------------- documentation


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the comment lines right above it, then the one after it.

    A config dataclass documents its keys with comments; this reads them back, so that what a
    key means is written once and the docs and generated files say the same.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    trailing = {
        tok.start[0]: tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    comments = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1  # 1-based line numbers: lines[row - 1] is the line above
        while row >= 1 and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, lines[row - 1])
            row -= 1
        after = [trailing[node.end_lineno]] if node.end_lineno in trailing else []
        text = " ".join(line.strip().lstrip("#").strip() for line in [*above, *after])
        if text:
            comments[node.target.id] = text
    return comments


# ----------------------------------------------------------------------------- saving


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-YAML form of a config (nested dicts, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
