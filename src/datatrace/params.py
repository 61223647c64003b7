"""Which parameters are in scope, and the map between named parameter tensors and one flat vector.

Influence is computed with respect to the parameters in scope (``params=`` patterns); the others are held fixed
at their trained values. Dense routes work on a flat vector ``theta`` of length ``p``; :class:`ParamSpace` is the
one place that knows the order, shapes and offsets of the named blocks in it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from datatrace.errors import bad_value


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def select_parameters(
    model: nn.Module, patterns: str | Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """Named trainable parameters of ``model`` matched by ``patterns``.

    A pattern matches a parameter name exactly, a module name (every parameter below it), or as a shell-style
    wildcard (``"layers.*.weight"``). ``None`` selects every parameter with ``requires_grad``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True). Fix: pass a model with parameters."
        )
    if patterns is None:
        return dict(named)
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        raise bad_value("params", patterns, "expected a string or a list of strings", "pass e.g. ['fc2']")
    chosen: dict[str, nn.Parameter] = {}
    names = [n for n, _ in named]
    for pattern in patterns:
        hits = [(n, p) for n, p in named if _matches(n, pattern)]
        if not hits:
            raise bad_value(
                "params",
                pattern,
                f"the pattern matches no trainable parameter; available names are {names[:12]}"
                + (" ..." if len(names) > 12 else ""),
                "use a parameter or module name from that list, or a wildcard such as 'fc*'",
            )
        chosen.update(hits)
    return {n: chosen[n] for n in names if n in chosen}  # model order


@dataclass(frozen=True)
class ParamSpace:
    """Order, shapes and sizes of the named parameter blocks that make up the flat vector ``theta``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ParamSpace:
        return cls(tuple(tensors), tuple(t.shape for t in tensors.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: Mapping[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate named blocks into one vector (keeping ``batch_dims`` leading axes)."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=batch_dims)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a vector (or a batch of vectors along the last axis) back into named blocks."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, list(self.sizes), dim=-1)
        return {n: piece.reshape(*lead, *s) for n, piece, s in zip(self.names, pieces, self.shapes)}
