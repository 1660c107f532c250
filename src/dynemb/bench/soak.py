"""Memory under sustained load: the resident memory of tritonserver and every stub process
it started, after warm-up and again after minutes at saturation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SoakResult:
    minutes: float
    concurrency: int
    rss_after_warmup_mb: float
    rss_end_mb: float
    samples_mb: list[float] = field(default_factory=list)  # every sample, in order
    calls: int = 0
    failed: int = 0

    @property
    def growth(self) -> float:
        """End over after-warm-up (target: within 10%)."""
        return self.rss_end_mb / self.rss_after_warmup_mb
