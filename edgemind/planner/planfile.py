"""Plan files: a plan written to disk as self-describing msgpack, and read back checked.

The file is one msgpack map::

    {"magic": "edgemind-plan", "format_version": 1, "edgemind_version": "0.1.0",
     "manifest_digest": ..., "policy_digest": ..., "plan": {...every Plan field...}}

written atomically (a temporary file in the same folder, then ``os.replace``). Loading
checks the magic and version (saying what it found against what it expected), rebuilds
the dataclasses field by field with type checks, and runs the independent checker.
:func:`check_plan_matches` then refuses a plan made for another model, policy or input.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import types
import typing
from typing import Any, Literal, Union

import msgpack

from edgemind.errors import PlanError, brief
from edgemind.files import atomic_write
from edgemind.planner.plan import Buffer, Plan, Step, TensorSlot, Witness
from edgemind.planner.verify import verify_plan

PLAN_MAGIC = "edgemind-plan"
DISTRIBUTION = "edgemind-runtime"  # the PyPI name: "edgemind" there is another project
PLAN_FORMAT_VERSION = 1
MAX_PLAN_BYTES = 256 << 20  # a plan of 100,000 buffers is a few MiB
_NESTED = {cls.__name__: cls for cls in (Buffer, Step, TensorSlot, Witness)}


def edgemind_version() -> str:
    """The installed edgemind version, or "0+unknown" when run from a bare checkout."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain msgpack-able values (tuples stay arrays)."""
    return dataclasses.asdict(plan)


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write ``plan`` to ``path`` atomically: readers see the old file or the new one."""
    blob = msgpack.packb(
        {
            "magic": PLAN_MAGIC,
            "format_version": PLAN_FORMAT_VERSION,
            "edgemind_version": edgemind_version(),
            "manifest_digest": plan.manifest_digest,
            "policy_digest": plan.policy_digest,
            "plan": plan_to_dict(plan),
        },
        use_bin_type=True,
    )
    atomic_write(path, lambda out: out.write(blob), flag="plan file", error=PlanError)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan file, check its header and rebuild and verify the plan."""
    from edgemind.files import read_bounded

    source = str(path)
    blob = read_bounded(path, MAX_PLAN_BYTES, what="plan file", error=PlanError)
    try:
        data = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types on bad input
        raise PlanError(
            f"{source}: not a plan file (not valid msgpack); re-run `edgemind plan --out`"
        ) from None
    if not isinstance(data, dict) or data.get("magic") != PLAN_MAGIC:
        found = data.get("magic") if isinstance(data, dict) else type(data).__name__
        raise PlanError(f"{source}: expected magic {brief(PLAN_MAGIC)}, found {brief(found)}")
    if data.get("format_version") != PLAN_FORMAT_VERSION:
        raise PlanError(
            f"{source}: plan format version {brief(data.get('format_version'))}, this edgemind "
            f"reads version {PLAN_FORMAT_VERSION}; re-run `edgemind plan --out`"
        )
    plan = _build(Plan, data.get("plan"), f"{source}: plan")
    for key in ("manifest_digest", "policy_digest"):
        if data.get(key) != getattr(plan, key):
            raise PlanError(f"{source}: header {key} {brief(data.get(key))} != the plan's")
    problems = verify_plan(plan)
    if problems:
        raise PlanError(f"{source}: plan fails verification: {'; '.join(problems[:5])}")
    return plan


def check_plan_matches(
    plan: Plan,
    manifest_digest: str,
    policy_digest: str,
    input_shape: tuple[int, ...] | list[int],
    *,
    source: str = "plan.msgpack",
) -> None:
    """Raise PlanError unless ``plan`` was made for this model, policy and input shape."""
    fix = "re-run `edgemind plan --out`"
    for what, made, now in (
        ("model digest", plan.manifest_digest, manifest_digest),
        ("policy digest", plan.policy_digest, policy_digest),
    ):
        if made != now:
            raise PlanError(
                f"{source} was made for {what} {made or '(none)'}, this "
                f"{what.split()[0]} is {now or '(none)'}; {fix}"
            )
    if tuple(plan.input_shape) != tuple(input_shape):
        raise PlanError(
            f"{source} was made for input shape {tuple(plan.input_shape)}, this request "
            f"has {tuple(input_shape)}; {fix}"
        )


def _build(cls: type, data: object, where: str) -> Any:
    """Rebuild dataclass ``cls`` from a map, checking every field's type."""
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected a map, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise PlanError(f"{where}: unknown fields {sorted(map(str, unknown))}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _value(hints[name], data[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING:
            raise PlanError(f"{where}: missing field {brief(name)}")
    return cls(**values)


def _value(hint: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _value(option, value, where)
            except PlanError:
                continue
        raise PlanError(f"{where}: unexpected value {brief(value)}")
    if origin is Literal:
        if value not in args:
            raise PlanError(f"{where}: expected one of {args}, found {brief(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise PlanError(f"{where}: expected an array, found {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise PlanError(f"{where}: expected {len(args)} items, found {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_value(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if hint is type(None):
        if value is not None:
            raise PlanError(f"{where}: expected nil, found {brief(value)}")
        return None
    if isinstance(hint, type) and hint.__name__ in _NESTED:
        return _build(_NESTED[hint.__name__], value, where)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PlanError(f"{where}: expected an integer, found {brief(value)}")
    if hint in (str, bool) and not isinstance(value, hint):
        raise PlanError(f"{where}: expected {hint.__name__}, found {brief(value)}")
    return value
