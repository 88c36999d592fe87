"""The ``monitor:`` section: a validated pydantic config with documented defaults.

    monitor:
      header: X-Client-Id          # request header naming the client (absent -> "anonymous")
      action: observe              # observe | harden | block, applied to a flagged client's later rows
      harden: {name: label_only}   # the stronger defense a flagged client gets under action: harden
      store: sqlite:///var/tmp/stealguard/monitor.sqlite   # or redis://host:port/db
      namespace: null              # key prefix in the store; null -> the model's name
      timeout_ms: 250              # SQLite busy_timeout / Redis socket timeout
      ttl_seconds: 86400           # a client idle this long is forgotten (state and flag)
      max_clients: 10000           # more clients than this: the least recently seen is evicted
      prada: {delta: 0.95, min_distances: 100, window: 1000, max_per_class: 50, outlier_std: 3.0, test_every: 10}
      ood: {threshold: 0.5, share: 0.4, min_queries: 100}   # score: max_prob (default) | gaussian
      watermark: {enabled: false, fraction: 0.005, key_env: STEALGUARD_WATERMARK_KEY, max_records: 10000}

Every failure is a ValueError naming ``monitor.<field>`` and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plugins.ood import DEFAULT_OOD_THRESHOLD, PosteriorGaussian

ACTIONS = ("observe", "harden", "block")
DEFAULT_STORE = "sqlite:///var/tmp/stealguard/monitor.sqlite"
# Juuti et al. 2019 (PRADA, EuroS&P 2019, arXiv 1805.02628), evaluation of the detector: for their MNIST model
# delta = 0.95 detects every tested extraction attack with no false positive on benign query streams.
PRADA_DELTA = 0.95
PRADA_MIN_DISTANCES = 100  # Algorithm 1 tests once |D| > 100
# The paper tests after every query; W over a 1,000-distance window barely moves per distance, and the test is
# most of the monitor's per-query cost, so it is re-run every 10 new distances (a flag is raised at most 9
# distances later than the paper's schedule; test_every: 1 is the paper's).
PRADA_TEST_EVERY = 10


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PradaConfig(_Strict):
    """PRADA's test (see :mod:`plugins.monitor.prada`)."""

    delta: float = Field(default=PRADA_DELTA, gt=0.0, lt=1.0, description="flag when Shapiro-Wilk W < delta")
    min_distances: int = Field(
        default=PRADA_MIN_DISTANCES, ge=3, le=5000, description="no test before this many distances"
    )
    window: int = Field(
        default=1000, ge=3, le=5000, description="the test runs over the most recent distances (bounded)"
    )
    max_per_class: int = Field(
        default=50, ge=1, le=10000, description="growing-set rows kept per (client, class); oldest evicted"
    )
    outlier_std: float = Field(default=3.0, gt=0.0, description="distances beyond mean +- this many std dropped")
    test_every: int = Field(
        default=PRADA_TEST_EVERY, ge=1, le=5000,
        description="W is recomputed once this many new distances joined the window (1: after every query)",
    )

    @model_validator(mode="after")
    def _window_holds_min(self) -> PradaConfig:
        if self.window < self.min_distances:
            raise ValueError(f"window ({self.window}) must be >= min_distances ({self.min_distances})")
        return self


class OODConfig(_Strict):
    """The client's share of queries that look out-of-distribution: a row does when ``1 - s > threshold``, ``s``
    its in-distribution score (plugins.ood.in_distribution_score): the victim's maximum probability
    (``score: max_prob``, the default), or with ``score: gaussian`` the posterior Gaussian's typicality under the
    fitted statistics in ``gaussian`` (ood_gated's gate score; ``lab.screen --fit-gaussian`` writes them), where a
    benign row is rarely below 1e-3, so thresholds sit near 1 (e.g. 0.999)."""

    threshold: float = Field(default=DEFAULT_OOD_THRESHOLD, ge=0.0, lt=1.0)
    share: float = Field(default=0.4, gt=0.0, le=1.0, description="flag when the OOD share exceeds this")
    min_queries: int = Field(default=100, ge=1, description="no OOD decision before this many queries")
    enabled: bool = True
    score: Literal["max_prob", "gaussian"] = "max_prob"
    gaussian: PosteriorGaussian | None = Field(
        default=None, description="score: gaussian's fitted statistics (plugins.ood.PosteriorGaussian)")

    @model_validator(mode="after")
    def _score_has_its_statistics(self) -> OODConfig:
        if self.score == "gaussian" and self.gaussian is None:
            raise ValueError("score: gaussian needs the fitted statistics in gaussian: {means, precision_tril} "
                             "(python -m mlflow_project.lab.screen --fit-gaussian PATH writes them)")
        if self.score == "max_prob" and self.gaussian is not None:
            raise ValueError("gaussian: statistics are given but score is max_prob; set score: gaussian or drop them")
        return self

    def check_classes(self, num_classes: int, field: str = "monitor") -> None:
        """Raise (naming ``<field>.ood.gaussian``) when the Gaussian score's class count is not the model's."""
        if self.gaussian is not None and self.gaussian.num_classes != num_classes:
            raise ValueError(f"{field}.ood.gaussian: fitted for {self.gaussian.num_classes} classes; the model has "
                             f"{num_classes}")


class WatermarkConfig(_Strict):
    """DAWN's output watermark (see :mod:`plugins.monitor.watermark`). The key is a deploy-time secret read
    from the environment variable ``key_env`` or the file ``key_file`` (outside the archive); there is no
    default key, and an enabled watermark without one makes the worker fail to load."""

    enabled: bool = False
    fraction: float = Field(default=0.005, gt=0.0, lt=1.0, description="share of queries watermarked")
    key_env: str | None = "STEALGUARD_WATERMARK_KEY"
    key_file: str | None = None
    max_records: int = Field(default=10000, ge=1, le=10_000_000, description="recorded queries kept (newest)")


class MonitorConfig(_Strict):
    header: str = Field(default="X-Client-Id", min_length=1)
    action: Literal["observe", "harden", "block"] = "observe"
    harden: dict[str, Any] = Field(default_factory=lambda: {"name": "label_only"})
    store: str = DEFAULT_STORE
    namespace: str | None = None
    timeout_ms: int = Field(default=250, ge=1, le=60_000)
    ttl_seconds: float = Field(default=86400.0, gt=0.0)
    max_clients: int = Field(default=10000, ge=1)
    prada: PradaConfig = Field(default_factory=PradaConfig)
    ood: OODConfig = Field(default_factory=OODConfig)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith("redis://") or v.startswith("rediss://") or v == "memory:"):
            raise ValueError(f"must be sqlite:///<path>, redis://host:port/db or memory:; got {v!r}")
        return v

    @field_validator("harden")
    @classmethod
    def _harden_defense(cls, v: dict[str, Any]) -> dict[str, Any]:
        from plugins.registry import validate_config

        validate_config(v)  # ValueError names the defense's field
        return v


def parse_monitor(section: Mapping[str, Any] | MonitorConfig | None, field: str = "monitor") -> MonitorConfig:
    """Validate a ``monitor:`` mapping; every error names ``<field>.<key>`` and what is allowed."""
    if isinstance(section, MonitorConfig):
        return section
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{field}: must be a mapping; got {type(section).__name__}")
    try:
        return MonitorConfig.model_validate(dict(section))
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in (field, *err["loc"]))
            if err["type"] == "extra_forbidden":
                parts.append(f"{loc}: unknown key")
            elif err["type"] == "value_error":  # our validators' messages already say what was given
                parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
            else:
                parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("invalid monitor config: " + "; ".join(parts)) from None
