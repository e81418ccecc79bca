"""The networks: the tutorial U-Net, the DDPM paper's U-Net, their layers and the CPU kernels."""

# What the modules here implement, for ddpm_ms.config to check without importing MindSpore:
# keep this file free of MindSpore imports.
ARCHS = ("tutorial", "ddpm")  # config key arch: tutorial_unet.Unet, ddpm_unet (the paper's U-Net)
ACTIVATIONS = ("gelu", "silu")  # config key act: layers.make_act builds one
BLOCK_TYPES = ("convnext", "resnet")  # tutorial_unet.Unet's block_type choices (config key block_type)


def level_problem(dim_mults, attn_levels):
    """Why ``dim_mults`` / ``attn_levels`` describe no U-Net, as (key, what is wrong), or None.

    Shared by tutorial_unet.Unet and config.validate (which words it as a config error).
    """
    if not dim_mults:
        return "dim_mults", "must not be empty"
    if attn_levels is not None and any(not 0 <= i < len(dim_mults) for i in attn_levels):
        return "attn_levels", f"{list(attn_levels)} must index levels 0..{len(dim_mults) - 1}"
    return None
