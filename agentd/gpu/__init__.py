"""GPU access, vendor by vendor (NVIDIA through NVML today), behind one small interface."""
