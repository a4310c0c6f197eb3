"""The "supported ops per backend" table: one row per pattern with its observation type and dtypes."""
from __future__ import annotations

from dataclasses import dataclass

from .backend_config import BackendConfig
from .dtype_config import ObservationType
from .pattern import pattern_to_str
from .pattern_config import BackendPatternConfig

__all__ = ["PatternRow", "patterns_table", "patterns_table_markdown"]

_OBSERVATION_TEXT = {
    ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT: "own output qparams",
    ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT: "shares input qparams",
    ObservationType.INPUT_OUTPUT_NOT_OBSERVED: "not observed",
}


@dataclass(frozen=True)
class PatternRow:
    """One row: pattern text (forward order, or the complex format marked ``complex:``), observation type
    text, the DTypeConfigs as short text, and what the pattern turns into (fused / QAT / reference module)."""

    pattern: str
    observation: str
    dtype_configs: tuple[str, ...]
    modules: str


def _modules_text(config: BackendPatternConfig) -> str:
    parts = [f"{label} {pattern_to_str(cls)}" for label, cls in (
        ("fuses to", config.fused_module), ("qat", config.qat_module),
        ("reference", config.reference_quantized_module)) if cls is not None]
    return "; ".join(parts)


def patterns_table(backend_config: BackendConfig) -> list[PatternRow]:
    """Rows for every pattern of ``backend_config``, in its order."""
    rows = []
    for config in backend_config.configs:
        if config.pattern is not None:
            text = pattern_to_str(config.pattern)
        else:
            text = "complex: " + pattern_to_str(config.complex_format_pattern)
        rows.append(PatternRow(text, _OBSERVATION_TEXT[config.observation_type],
                               tuple(dc.short_str() for dc in config.dtype_configs), _modules_text(config)))
    return rows


def patterns_table_markdown(backend_config: BackendConfig) -> str:
    """:func:`patterns_table` as a Markdown table (for the docs)."""
    lines = [f"### {backend_config.name}", "", "| pattern | observation | dtypes | modules |", "|---|---|---|---|"]
    for r in patterns_table(backend_config):
        cells = (r.pattern, r.observation, "<br>".join(r.dtype_configs), r.modules)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
