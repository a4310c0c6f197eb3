"""torch.ao.quantization.fx spellings (``fxquant.fx.custom_config``) for code migrated from torch.ao."""
