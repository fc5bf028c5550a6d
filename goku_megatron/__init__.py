"""goku-megatron: Goku-style rectified-flow text-to-image/video training on Megatron-Core."""

from goku_megatron import cpu_compat, logs

# Before anything imports megatron-core (cpu_compat.disable_jit_fuser_on_cpu and
# logs.fold_known_warnings say why).
cpu_compat.disable_jit_fuser_on_cpu()
logs.fold_known_warnings()
