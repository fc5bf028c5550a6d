"""goku-megatron: Goku-style rectified-flow text-to-image/video training on Megatron-Core."""

from goku_megatron import cpu_compat

# Before anything imports megatron-core (cpu_compat.disable_jit_fuser_on_cpu says why).
cpu_compat.disable_jit_fuser_on_cpu()
