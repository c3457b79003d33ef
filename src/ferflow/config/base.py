"""The base of every params section, and field checks that several sections share."""

from __future__ import annotations

import re
from typing import Any, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# What numpy's legacy seeding (np.random.seed) and torch.manual_seed both take.
SEED_MAX = 2**32 - 1


def seed_field(default: int) -> Any:
    return Field(default=default, ge=0, le=SEED_MAX, description=f"0..{SEED_MAX} (numpy and torch seed range)")


def sha256_digest(v: str) -> str:
    """A sha256 hex digest, normalised; ValueError otherwise."""
    v = v.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ValueError("must be a sha256 digest: 64 hexadecimal digits")
    return v


def optional_sha256(v: Optional[str]) -> Optional[str]:
    return v if v is None else sha256_digest(v)


def _number_leaves(annotation: Any) -> set:
    """The plain types inside an annotation: Optional[int] -> {int, NoneType}, tuple[float, float] -> {float}."""
    if get_origin(annotation) in (Union, list, tuple, dict, set) or type(annotation).__name__ == "UnionType":
        return set().union(*(_number_leaves(a) for a in get_args(annotation) if a is not Ellipsis))
    return {annotation} if isinstance(annotation, type) else set()


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, dict) and any(_holds_bool(v) for v in value.values())


class Frozen(BaseModel):
    """Immutable, and refuses unknown keys, inf/nan and booleans given for numbers."""

    # No inf/nan in any float field: `lr: .inf` would validate, then train to `loss nan`.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1 for int and float fields (batch_size=true ->
        # 1); a number is never meant as a boolean. A validator on every field of every model,
        # rather than StrictInt on each, also covers fields added later; ints and numeric
        # strings (PyYAML reads `1e-3` as a string) stay accepted for floats.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _holds_bool(value):
            leaves = _number_leaves(field.annotation)
            if leaves & {int, float} and bool not in leaves:
                raise ValueError("expected a number, not a boolean (true/false)")
        return value
