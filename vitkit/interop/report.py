"""The coverage report every load produces: what was mapped, reshaped, ignored (and why), and what is missing.

Partial loads that say "success" are the classic failure of checkpoint converters. Here every source tensor
ends in exactly one bucket, every model tensor is either filled or listed as missing, and `check(strict=True)`
turns any gap into an error that names the tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..model.serialization import CheckpointError

log = logging.getLogger("vitkit.interop")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class HubOrigin:
    """Where a checkpoint loaded by name came from: the repo, the commit its files belong to, the cache folder."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[str, ...]
    cache_path: str  # the snapshot folder of that commit in the Hub cache
    endpoint: str
    offline: bool  # read from the cache without asking the Hub

    def describe(self) -> str:
        """One line: `Hub repo 'timm/x' revision main, commit 0123..., from https://huggingface.co: files in DIR`."""
        how = "from the cache without asking the Hub" if self.offline else f"from {self.endpoint}"
        return (
            f"Hub repo '{self.repo_id}' revision {self.revision}, commit {self.commit}, {how}: "
            f"{', '.join(self.files)} in {self.cache_path}"
        )


@dataclass
class LoadReport:
    """Where each tensor of a foreign checkpoint went.

    mapped: (source name, vitkit name) copied as is. reshaped: (source name(s), vitkit name, source shape,
    vitkit shape) transposed, fused or split. ignored: (source name, reason) left out on purpose.
    unmatched: source tensors no rule knows. missing: model tensors the source did not provide.
    mismatched: model tensors whose source shape does not fit. notes: decisions worth knowing (defaults used).
    """

    source: str
    format: str
    mapped: list[tuple[str, str]] = field(default_factory=list)
    reshaped: list[tuple[str, str, Shape, Shape]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    origin: HubOrigin | None = None  # set when the checkpoint was named by a Hub repo rather than a path

    def map(self, src: str, dst: str) -> None:
        self.mapped.append((src, dst))

    def reshape(self, src: str, dst: str, src_shape: Shape, dst_shape: Shape) -> None:
        self.reshaped.append((src, dst, tuple(src_shape), tuple(dst_shape)))

    def ignore(self, src: str, reason: str) -> None:
        self.ignored.append((src, reason))

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def complete(self) -> bool:
        """True when every source tensor was used or ignored on purpose and every model tensor was filled."""
        return not (self.unmatched or self.missing or self.mismatched)

    def summary(self) -> str:
        """One line: `'<source>' (<format>): 150 mapped, 48 reshaped, 2 ignored, 0 unmatched, 0 missing`."""
        source = f"{self.origin.repo_id}@{self.origin.commit[:12]}" if self.origin else self.source
        return (
            f"'{source}' ({self.format}): {len(self.mapped)} mapped, {len(self.reshaped)} reshaped, "
            f"{len(self.ignored)} ignored, {len(self.unmatched)} unmatched, {len(self.missing)} missing, "
            f"{len(self.mismatched)} wrong shape"
        )

    def details(self, limit: int = 20) -> str:
        """Multi-line text: the summary, then every bucket that needs attention, examples of reshapes, notes."""
        lines = [self.summary()]
        if self.origin is not None:
            lines.append(f"  from: {self.origin.describe()}")

        def section(title: str, items: list[str], count: int | None = None) -> None:
            if items:
                lines.append(f"  {title} ({len(items) if count is None else count}):")
                lines.extend(f"    {s}" for s in items[:limit])
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")

        section("unmatched source tensors (no rule maps them)", self.unmatched)
        section("missing model tensors (not in the source)", self.missing)
        section("wrong shape", self.mismatched)
        by_reason: dict[str, list[str]] = {}
        for src, reason in self.ignored:
            by_reason.setdefault(reason, []).append(src)
        ignored = [f"{', '.join(n[:4])}{' ...' if len(n) > 4 else ''}: {r}" for r, n in by_reason.items()]
        section("ignored", ignored, count=len(self.ignored))
        examples = [f"{s} {a} -> {d} {b}" for s, d, a, b in self.reshaped[:3]]
        section("reshaped (transposed / fused / split to vitkit's layout), e.g.", examples, count=len(self.reshaped))
        section("notes", self.notes)
        return "\n".join(lines)

    def log(self) -> None:
        """Summary at INFO; anything short of complete, and ignored tensors, at WARNING."""
        if self.complete and not self.ignored:
            log.info(self.details())
        else:
            log.warning(self.details())

    def check(self, strict: bool = True) -> None:
        """Raise CheckpointError naming every unmatched, missing or mis-shaped tensor (only when strict)."""
        if strict and not self.complete:
            raise CheckpointError(
                f"{self.details()}\nthe checkpoint does not fit exactly; fix the source or the overrides, or pass "
                "strict=False (CLI: --no-strict) to load what matches and keep the rest freshly initialised"
            )


__all__ = ["LoadReport", "HubOrigin"]
