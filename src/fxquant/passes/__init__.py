"""fxquant's graph passes, one per file; importing this package registers them all."""
from . import (addmm_as_linear, annotate, assign_qconfig, fuse, observe, qat_swap, record_state, share,  # noqa: F401
               special_modules, to_reference, trace, verify)
from . import lower, lower_cleanup, lower_signature  # noqa: F401,E402  (convert_fx's lowering passes)
from . import quantized_io, quantized_io_convert  # noqa: F401,E402  (quantized model inputs / outputs)
from . import bake_parametrizations  # noqa: F401,E402  (converted models hold no parametrized modules)
