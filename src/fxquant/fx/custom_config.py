"""Alias of :mod:`fxquant.custom_config` at torch.ao's path ``torch.ao.quantization.fx.custom_config``."""
from ..custom_config import *  # noqa: F401,F403
from ..custom_config import __all__  # noqa: F401
