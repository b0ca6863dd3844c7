"""Specs: the YAML schema (Pydantic v2) and the loader with overrides and clear errors."""

from rtlib.spec.load import SpecError, apply_overrides, load_spec, validate_spec
from rtlib.spec.schema import (
    AttentionSpec,
    EmbeddingSpec,
    FeedForwardSpec,
    FullHeads,
    HeadCounts,
    LocalHeads,
    ModelSpec,
    RoutingHeads,
    RoutingSpec,
    Spec,
)

__all__ = [
    "AttentionSpec",
    "EmbeddingSpec",
    "FeedForwardSpec",
    "FullHeads",
    "HeadCounts",
    "LocalHeads",
    "ModelSpec",
    "RoutingHeads",
    "RoutingSpec",
    "Spec",
    "SpecError",
    "apply_overrides",
    "load_spec",
    "validate_spec",
]
