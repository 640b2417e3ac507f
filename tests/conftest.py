"""Every test sees 8 fake CPU devices, so sharding runs as it would over 8 chips."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
