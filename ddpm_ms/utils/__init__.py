"""What every layer uses: errors, atomic files, caches, the device, checkpoint files, images."""
