"""Float comparisons whose bounds follow from the computation, not from one CPU's kernels.

Two fp32 computations of the same value differ by rounding that depends on the kernels torch picks
at run time: the SIMD width (ATEN_CPU_CAPABILITY default / avx2 / avx512), the BLAS blocking of a
matrix of another row count, and how a reduction is split over OpenMP threads. An absolute bound
such as 1e-5 is then right on one machine and wrong on the next: the plain block's activations
reach ~60 in magnitude, where one fp32 ulp is already 3.8e-6. So every bound here is a number of
fp32 epsilons of the tensors' own scale (``assert_close_to_scale``), or, where an independent
reference exists, an error measured against its float64 run (``assert_as_accurate``).

Comparisons that must be bitwise (exact resume, layouts documented as identical) do not come here:
they use ``torch.equal`` or ``rtol=0, atol=0`` and say why they hold on every kernel.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp at 1.0
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 7.8e-3: bf16 keeps 8 significant bits


def scale_of(tensor: torch.Tensor) -> float:
    """The tensor's magnitude: the largest absolute element (0.0 for an empty or all-zero tensor)."""
    return tensor.detach().abs().max().item() if tensor.numel() else 0.0


def _error(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}non-finite values differ"
    if not actual.numel():
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, ulps: float, msg: str = "",
                          plus: float = 0.0) -> None:
    """Every element of ``actual`` within ``ulps`` fp32 epsilons of ``expected``'s scale, plus
    ``plus`` for an error that does not scale with the tensor (its caller says which).

    For two fp32 computations of the same value that sum in another order (other kernels, another
    split of the work over ranks or threads): rounding errors accumulate relative to the magnitude
    of what is summed, not of each result element, so the bound scales with the tensor. ``ulps``
    is the test's error budget: a few for one elementwise pass, tens for a layer of matmuls,
    hundreds for gradients and weights after optimizer steps.
    """
    what = f"{msg}: " if msg else ""
    error = _error(actual, expected, what)
    bound = ulps * EPS32 * scale_of(expected) + plus
    assert error <= bound, (f"{what}max |actual - expected| = {error:.3g} > {bound:.3g} "
                            f"({ulps} fp32 ulps of the scale {scale_of(expected):.3g}"
                            f"{f' + {plus:.3g}' if plus else ''})")


def assert_as_accurate(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, factor: float = 4.0,
                       ulps: float = 8.0, msg: str = "") -> None:
    """``actual`` (fp32) is as close to ``exact`` (the reference run in float64) as ``reference``
    (the same reference run in fp32) is, within ``factor``, plus ``ulps`` epsilons of the scale.

    The reference's own fp32 error measures what this computation's rounding costs on the kernels
    of this machine, so the bound moves with the CPU instead of being tuned to one.
    """
    what = f"{msg}: " if msg else ""
    error = _error(actual, exact, what)
    reference_error = _error(reference, exact, what)
    bound = factor * reference_error + ulps * EPS32 * scale_of(exact)
    assert error <= bound, (f"{what}max |actual - float64| = {error:.3g} > {bound:.3g} "
                            f"(reference fp32 error {reference_error:.3g}, scale {scale_of(exact):.3g})")


def assert_within_bf16_rounding(actual: torch.Tensor, bf16_reference: torch.Tensor, fp32_reference: torch.Tensor,
                                factor: float = 4.0, bf16_ulps: float = 2.0, slack: float = 0.0,
                                msg: str = "") -> None:
    """``actual`` (a bf16 run) is as close to ``fp32_reference`` (the same run in fp32) as
    ``bf16_reference`` (the one-process bf16 run) is, within ``factor``, plus ``bf16_ulps`` bf16
    epsilons of the scale and an absolute ``slack`` (for what rounding can flip, see its caller).

    bf16 keeps 8 significant bits of every weight and activation, so two bf16 computations of one
    value differ by far more than fp32 rounding, by an amount the computation sets: the one-process
    bf16 run's distance from fp32 measures it on this machine's kernels.
    """
    what = f"{msg}: " if msg else ""
    error = _error(actual, fp32_reference, what)
    reference_error = _error(bf16_reference, fp32_reference, what)
    bound = factor * reference_error + bf16_ulps * EPS_BF16 * scale_of(fp32_reference) + slack
    assert error <= bound, (f"{what}max |bf16 run - fp32| = {error:.3g} > {bound:.3g} (one-process bf16 "
                            f"error {reference_error:.3g}, scale {scale_of(fp32_reference):.3g})")
