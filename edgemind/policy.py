"""The run policy: arena capacity, residency, what to do when a request does not fit.

Read from ``policy.yaml``; ``EDGE_MODEL_ARENA_MB`` overrides the capacity and explicit
overrides (CLI flags) override both. Capacities in MB mean MiB (2**20 bytes).

>>> policy = load_policy(None, env={})
>>> policy.arena_capacity_bytes
52428800
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from edgemind.errors import PolicyError, brief
from edgemind.files import read_bounded
from edgemind.units import DIRECT_IO_BLOCK, MAX_CAPACITY_BYTES, MIB, format_bytes, mib_to_bytes

ENV_ARENA_MB = "EDGE_MODEL_ARENA_MB"
QUOTA_ACTIONS = ("early_exit", "reject_request")
READ_MODES = ("buffered", "direct")
ENFORCE_MODES = ("off", "warn", "fail")
TILING_MODES = ("auto", "off")
KV_DTYPES = ("float32", "bfloat16")
MAX_POLICY_BYTES = 1 << 20  # a policy file is a few lines
MAX_POLICY_DEPTH = 8  # sections, keys, values: three levels are all a policy has
MAX_HTTP_ADDR_CHARS = 270  # a 253-character host name, brackets, colon, port
Residency = int | Literal["auto"]

# The valid keys of policy.yaml, section by section, with the field each one sets.
_SCHEMA: dict[str, dict[str, str]] = {
    "model": {
        "arena_capacity_mb": "arena_capacity_bytes",
        "keep_resident_layers": "keep_resident_layers",
        "prefetch_depth": "prefetch_depth",
        "alignment_bytes": "alignment_bytes",
        "verify_checksums": "verify_checksums",
        "read_mode": "read_mode",
        "enforce": "enforce",
        "tiling": "tiling",
        "kv_dtype": "kv_dtype",
    },
    "scheduler": {"on_memory_quota_exceeded": "on_memory_quota_exceeded"},
    "metrics": {"enable_http": "metrics_enable_http", "http_addr": "metrics_http_addr"},
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a model is run: the budget, the residency, and the quota action.

    ``keep_resident_layers`` caps how many layers' weights are in the arena at once,
    prefetch staging aside: the running layer plus ``n - 1`` layers pinned across
    requests; ``"auto"`` pins as many as the spare capacity holds.
    """

    arena_capacity_bytes: int = 50 * MIB
    keep_resident_layers: Residency = 1
    prefetch_depth: int = 1
    alignment_bytes: int = 64
    verify_checksums: bool = False
    read_mode: Literal["buffered", "direct"] = "buffered"
    enforce: Literal["off", "warn", "fail"] = "warn"
    # "auto": split units whose weights do not fit into tiles (docs/design.md, "Tiles")
    tiling: Literal["auto", "off"] = "off"
    kv_dtype: Literal["float32", "bfloat16"] = "float32"  # a decoder's KV cache
    on_memory_quota_exceeded: Literal["early_exit", "reject_request"] = "early_exit"
    metrics_enable_http: bool = False
    metrics_http_addr: str = "127.0.0.1:9090"

    def __post_init__(self) -> None:
        _check_int("model.arena_capacity_mb", self.arena_capacity_bytes, minimum=1)
        if self.arena_capacity_bytes > MAX_CAPACITY_BYTES:
            raise PolicyError(
                f"model.arena_capacity_mb: {self.arena_capacity_bytes} bytes is more than the "
                f"{MAX_CAPACITY_BYTES // MIB} MiB (1 PiB) edgemind accepts"
            )
        if self.keep_resident_layers != "auto":
            value = self.keep_resident_layers
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(
                    "model.keep_resident_layers: expected an integer >= 1 or 'auto', got "
                    f"{brief(value)}"
                )
        _check_int("model.prefetch_depth", self.prefetch_depth, minimum=0)
        _check_int("model.alignment_bytes", self.alignment_bytes, minimum=64)
        if self.alignment_bytes & (self.alignment_bytes - 1):
            raise PolicyError(
                f"model.alignment_bytes: expected a power of two >= 64, got {self.alignment_bytes}"
            )
        for key, value in (
            ("model.verify_checksums", self.verify_checksums),
            ("metrics.enable_http", self.metrics_enable_http),
        ):
            if not isinstance(value, bool):
                raise PolicyError(f"{key}: expected true or false, got {brief(value)}")
        if self.read_mode not in READ_MODES:
            raise PolicyError(
                f"model.read_mode: expected one of {', '.join(READ_MODES)}, got "
                f"{brief(self.read_mode)}"
            )
        if self.tiling not in TILING_MODES:
            raise PolicyError(
                f"model.tiling: expected one of {', '.join(TILING_MODES)}, got {self.tiling!r}"
            )
        if self.kv_dtype not in KV_DTYPES:
            raise PolicyError(
                f"model.kv_dtype: expected one of {', '.join(KV_DTYPES)}, got "
                f"{brief(self.kv_dtype)}"
            )
        if self.enforce not in ENFORCE_MODES:
            raise PolicyError(
                f"model.enforce: expected one of {', '.join(ENFORCE_MODES)}, got "
                f"{brief(self.enforce)}"
            )
        if self.on_memory_quota_exceeded not in QUOTA_ACTIONS:
            raise PolicyError(
                "scheduler.on_memory_quota_exceeded: expected one of "
                f"{', '.join(QUOTA_ACTIONS)}, got {brief(self.on_memory_quota_exceeded)}"
            )
        addr = self.metrics_http_addr
        port = addr.rpartition(":")[2] if isinstance(addr, str) else ""
        if not port.isdigit() or len(port) > 5 or int(port) > 65535:
            raise PolicyError(f"metrics.http_addr: expected 'host:port', got {brief(addr)}")
        if len(addr) > MAX_HTTP_ADDR_CHARS:
            raise PolicyError(
                f"metrics.http_addr: {brief(addr, 40)} is {len(addr)} characters; a host name "
                "has at most 253"
            )

    @property
    def buffer_alignment_bytes(self) -> int:
        """Alignment of every arena buffer: direct reads need whole 4 KiB blocks."""
        if self.read_mode == "direct":
            return max(self.alignment_bytes, DIRECT_IO_BLOCK)
        return self.alignment_bytes

    def replace(self, **changes: Any) -> Policy:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON-able values."""
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of everything that affects a plan (not metrics or verification)."""
        ignored = ("metrics_enable_http", "metrics_http_addr", "verify_checksums", "enforce")
        planning = {k: v for k, v in self.to_dict().items() if k not in ignored}
        blob = json.dumps(planning, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        """One line for humans."""
        return (
            f"arena {format_bytes(self.arena_capacity_bytes)}, "
            f"keep_resident_layers={self.keep_resident_layers}, "
            f"prefetch_depth={self.prefetch_depth}, on quota: {self.on_memory_quota_exceeded}"
        )


def _check_int(key: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{key}: expected an integer >= {minimum}, got {brief(value)}")


def _capacity_from_mb(where: str, value: object) -> int:
    if isinstance(value, str):
        try:
            value = float(value[:100])
        except ValueError:
            raise PolicyError(
                f"{where}: expected a positive number of MiB, got {brief(value)}"
            ) from None
    try:
        nbytes = mib_to_bytes(value)  # type: ignore[arg-type]
    except (ValueError, OverflowError) as exc:
        raise PolicyError(f"{where}: {exc}") from None
    if nbytes < 1:
        raise PolicyError(f"{where}: {brief(value)} MiB is less than one byte")
    return nbytes


class _PolicyLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and with bounded nesting.

    A policy needs neither; refusing them keeps a few hostile bytes (an alias bomb, a
    list nested thousands deep) from costing gigabytes or overflowing the stack.
    """

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise PolicyError(
                f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a policy; "
                "write the value out"
            )
        self.depth += 1
        try:
            if self.depth > MAX_POLICY_DEPTH:
                mark = self.peek_event().start_mark
                raise PolicyError(
                    f"line {mark.line + 1}: nested more than {MAX_POLICY_DEPTH} levels; a "
                    "policy has sections of keys and values"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _parse_yaml(blob: bytes, source: str) -> Any:
    """The policy file's YAML document (UTF-8, no aliases, shallow), or a PolicyError."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"{source}: not UTF-8 (byte 0x{blob[exc.start]:02x} at offset {exc.start}); save "
            "the policy as UTF-8"
        ) from None
    loader = None
    try:
        loader = _PolicyLoader(text)  # checks the characters: a NUL is a YAMLError
        return loader.get_single_data()
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise PolicyError(f"{source}: not valid YAML{where}") from None
    except (RecursionError, ValueError, OverflowError) as exc:  # a 5,000-digit int...
        raise PolicyError(f"{source}: cannot read the YAML ({str(exc)[:80]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _name(key: object) -> str:
    """A YAML key as written, cut short (keys can be any YAML value)."""
    return key[:40] if isinstance(key, str) and key.isprintable() else brief(key, 40)


def _fields_from_yaml(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for section, body in data.items():
        if section not in _SCHEMA:
            raise PolicyError(
                f"{source}: unknown section {_name(section)!r}; valid sections: "
                f"{', '.join(_SCHEMA)}"
            )
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise PolicyError(f"{source}: section {section!r} must be a mapping of keys")
        for key, value in body.items():
            if key not in _SCHEMA[section]:
                valid = ", ".join(f"{section}.{k}" for k in _SCHEMA[section])
                raise PolicyError(
                    f"{source}: unknown key {section}.{_name(key)}; valid keys: {valid}"
                )
            field = _SCHEMA[section][key]
            if field == "arena_capacity_bytes":
                value = _capacity_from_mb(f"{source}: {section}.{key}", value)
            elif field in ("enforce", "tiling") and value is False:
                value = "off"  # YAML 1.1 reads a bare `off` as false
            fields[field] = value
    return fields


def load_policy(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Policy:
    """Build a policy from a YAML file (optional), the environment, then overrides.

    ``overrides`` are field names of :class:`Policy` (``arena_capacity_bytes=...``);
    ``None`` values are ignored so CLI flags can be passed straight through.
    """
    env = os.environ if env is None else env
    fields: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        blob = read_bounded(path, MAX_POLICY_BYTES, what="policy file", error=PolicyError)
        data = _parse_yaml(blob, source)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: expected a mapping with sections {', '.join(_SCHEMA)}")
        fields.update(_fields_from_yaml(data, source))
        try:  # the file's values on their own first, so an error names the file
            Policy(**fields)
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None
    if env.get(ENV_ARENA_MB, "").strip():
        fields["arena_capacity_bytes"] = _capacity_from_mb(ENV_ARENA_MB, env[ENV_ARENA_MB])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        names = [f.name for f in dataclasses.fields(Policy)]
        if key not in names:
            raise PolicyError(f"unknown policy field {key!r}; valid fields: {', '.join(names)}")
        fields[key] = value
    try:
        return Policy(**fields)
    except TypeError as exc:  # pragma: no cover - guarded by the schema above
        raise PolicyError(str(exc)) from None
