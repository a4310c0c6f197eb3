"""BackendConfig: the set of patterns a backend can quantize, each a :class:`BackendPatternConfig`."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .pattern import Pattern, to_complex_format, validate_complex_pattern
from .pattern_config import BackendPatternConfig

__all__ = ["BackendConfig"]


class BackendConfig:
    """Patterns a backend supports and how to quantize each (torch.ao's chainable API).

    Configs are keyed by their pattern in the complex (reversed nested) format: setting a config for a
    pattern that already has one replaces it, keeping its position. Example::

        linear = BackendPatternConfig(nn.Linear).add_dtype_config(
            DTypeConfig(torch.uint8, torch.uint8, torch.int8, torch.float))
        backend_config = BackendConfig("my_backend").set_backend_pattern_config(linear)
    """

    def __init__(self, name: str = "") -> None:
        self.name = ""
        self.set_name(name)
        self._pattern_complex_format_to_config: dict[Pattern, BackendPatternConfig] = {}

    def __repr__(self) -> str:
        return f"BackendConfig(name={self.name!r}, {len(self._pattern_complex_format_to_config)} patterns)"

    def __len__(self) -> int:
        return len(self._pattern_complex_format_to_config)

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "configs": self.configs}  # keys are rebuilt (they hold unpicklable ops)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])
        self.set_backend_pattern_configs(state["configs"])

    def set_name(self, name: str) -> BackendConfig:
        """Set the backend's name (e.g. ``"x86"``)."""
        if not isinstance(name, str):
            raise TypeError(f"BackendConfig name must be a str, got {name!r}")
        self.name = name
        return self

    def set_backend_pattern_config(self, config: BackendPatternConfig) -> BackendConfig:
        """Add ``config``, replacing any earlier config for the same pattern."""
        if not isinstance(config, BackendPatternConfig):
            raise TypeError(f"expected a BackendPatternConfig (or use BackendConfig.from_dict for dicts), "
                            f"got {config!r}")
        self._pattern_complex_format_to_config[config.complex_format_pattern] = config
        return self

    def set_backend_pattern_configs(self, configs: Iterable[BackendPatternConfig]) -> BackendConfig:
        """Add each of ``configs`` in order (later ones replace earlier ones for the same pattern)."""
        if isinstance(configs, BackendPatternConfig):
            raise TypeError("set_backend_pattern_configs expects a list; use set_backend_pattern_config for one")
        for config in configs:
            self.set_backend_pattern_config(config)
        return self

    @property
    def configs(self) -> list[BackendPatternConfig]:
        """A copy of the list of pattern configs, in insertion order."""
        return list(self._pattern_complex_format_to_config.values())

    @property
    def complex_format_to_config(self) -> Mapping[Pattern, BackendPatternConfig]:
        """Read-only map from complex-format pattern to its config (what a pattern matcher iterates)."""
        return MappingProxyType(self._pattern_complex_format_to_config)

    def get_config(self, pattern: Pattern, complex_format: bool = False) -> BackendPatternConfig | None:
        """The config for ``pattern`` (simple format, or complex format if ``complex_format``), or None."""
        key = validate_complex_pattern(pattern) if complex_format else to_complex_format(pattern)
        return self._pattern_complex_format_to_config.get(key)

    def __contains__(self, pattern: Pattern) -> bool:
        return self.get_config(pattern) is not None

    @classmethod
    def from_dict(cls, backend_config_dict: Mapping[str, Any]) -> BackendConfig:
        """Build from ``{"name": str, "configs": [BackendPatternConfig or its dict form, ...]}``."""
        if isinstance(backend_config_dict, BackendConfig):
            return backend_config_dict
        if not isinstance(backend_config_dict, Mapping):
            raise TypeError(f"BackendConfig.from_dict expects a dict, got {backend_config_dict!r}")
        unknown = set(backend_config_dict) - {"name", "configs"}
        if unknown:
            raise ValueError(f"unknown BackendConfig keys {sorted(unknown)}; valid keys: ['name', 'configs']")
        conf = cls(backend_config_dict.get("name", ""))
        for index, entry in enumerate(backend_config_dict.get("configs", [])):
            if isinstance(entry, Mapping):
                entry = BackendPatternConfig.from_dict(entry)
            if not isinstance(entry, BackendPatternConfig):
                raise TypeError(f"backend_config_dict['configs'][{index}] must be a dict or a "
                                f"BackendPatternConfig, got {entry!r}")
            conf.set_backend_pattern_config(entry)
        return conf

    def to_dict(self) -> dict[str, Any]:
        """The dict form read by :meth:`from_dict`."""
        return {"name": self.name, "configs": [c.to_dict() for c in self.configs]}
