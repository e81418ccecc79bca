"""The networks: the tutorial U-Net, the DDPM paper's U-Net, their layers and the CPU kernels."""
