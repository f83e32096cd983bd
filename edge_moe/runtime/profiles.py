"""Device profiles: YAML files naming a device class's budget, threads, widths and policy (profiles/,
packaged as edge_moe/data/profiles), read and checked field by field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from edge_moe.config import DENSE_BITS, parse_size
from edge_moe.errors import EdgeMoeError, UsageError
from edge_moe.format.nested import BASE_BITS, MAX_BITS
from edge_moe.runtime.bit_policy import BitRequest
from edge_moe.runtime.moe import STREAMING

PROFILE_DIR = Path(__file__).resolve().parents[1] / "data" / "profiles"
KNOBS = ("bits", "quality", "min_bits", "max_bits")
RATES = ("dram_read_gb_s", "disk_read_mb_s", "disk_direct_read_mb_s")  # measured on the device; optional
COSTS = (*RATES, "expert_ms", "expert_model")  # and one token through one expert, ms by width, of a model


@dataclass(frozen=True)
class DeviceProfile:
    """What a profile sets; None: the built-in default."""

    name: str
    description: str = ""
    device: str = "cpu"
    memory_budget: int | None = None
    gpu_memory_budget: int | None = None
    threads: int | None = None
    dense_bits: int | None = None
    max_context: int | None = None
    streaming: str | None = None
    max_batch: int | None = None
    knobs: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)


def available() -> list[str]:
    """The names of the packaged profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A packaged profile by name, or a YAML file by path; a bad field is refused by name and reason."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UsageError(f"--profile {name_or_path}: no such profile; packaged: {', '.join(available())} "
                             "(or give a .yaml file's path)")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UsageError(f"--profile {name_or_path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"profile {path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"profile {path}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return _checked(data)
    except _Bad as e:
        raise UsageError(f"profile {path}: field {e.args[0]!r} {e.args[1]}") from None


class _Bad(Exception):
    """(field, reason)"""


def _checked(data: dict) -> DeviceProfile:
    known = {f.name for f in fields(DeviceProfile)}
    for key in data:
        if key not in known:
            raise _Bad(key, f"is not a profile field (fields: {', '.join(sorted(known))})")
    values = {k: v for k, v in data.items() if v is not None}
    if not isinstance(values.get("name"), str) or not values["name"]:
        raise _Bad("name", "must be a non-empty string")
    _is(values, "description", str)
    if values.get("device", "cpu") not in ("cpu", "cuda"):
        raise _Bad("device", "must be cpu or cuda")
    for key in ("memory_budget", "gpu_memory_budget"):
        if key in values:
            try:
                values[key] = parse_size(values[key])
            except EdgeMoeError:
                raise _Bad(key, f"= {values[key]!r} is not a size like 6GB or 512MB") from None
    for key in ("threads", "max_context", "max_batch"):
        if key in values and (type(values[key]) is not int or values[key] < 1):
            raise _Bad(key, f"= {values[key]!r} must be a whole number of 1 or more")
    if values.get("dense_bits", DENSE_BITS[-1]) not in DENSE_BITS:
        raise _Bad("dense_bits", f"must be one of {', '.join(map(str, DENSE_BITS))}")
    if values.get("streaming", "hebf") not in STREAMING:
        raise _Bad("streaming", f"must be one of {', '.join(STREAMING)}")
    values["knobs"] = _knobs(values.get("knobs", {}))
    values["costs"] = _costs(values.get("costs", {}))
    return DeviceProfile(**values)


def _is(values: dict, key: str, kind) -> None:
    if key in values and not isinstance(values[key], kind):
        raise _Bad(key, f"must be a {kind.__name__}")


def _knobs(knobs) -> dict:
    if not isinstance(knobs, dict) or set(knobs) - set(KNOBS):
        raise _Bad("knobs", f"must map some of {', '.join(KNOBS)} to values")
    try:
        BitRequest.make(**knobs)
    except (UsageError, TypeError, ValueError) as e:
        raise _Bad("knobs", f"are not a valid request: {e}") from None
    return dict(knobs)


def _costs(costs) -> dict:
    if not isinstance(costs, dict) or set(costs) - set(COSTS) or not all(
            _positive(costs[k]) for k in RATES if k in costs):
        raise _Bad("costs", f"must map some of {', '.join(RATES)} to positive numbers (and expert_ms, "
                            "expert_model)")
    per_width = costs.get("expert_ms", {})
    if not isinstance(per_width, dict) or not all(
            type(b) is int and BASE_BITS <= b <= MAX_BITS and _positive(v) for b, v in per_width.items()):
        raise _Bad("costs", f"expert_ms must map widths {BASE_BITS}..{MAX_BITS} to positive milliseconds")
    if not isinstance(costs.get("expert_model", ""), str):
        raise _Bad("costs", "expert_model must be the measured model's file name")
    return dict(costs)


def _positive(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v > 0
