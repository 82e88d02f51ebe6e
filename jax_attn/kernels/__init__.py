"""Attention kernels, one file each; :mod:`jax_attn.dispatch` chooses among them.

Every kernel takes batched ``q [B, T, N, H]``, ``k/v [B, S, K, H]``, the validated
:class:`~jax_attn.validation.AttentionCall` and the call's
:class:`~jax_attn.validation.KernelInputs` (``fn(q, k, v, *, call, inputs)``, see
:class:`~jax_attn.kernels.base.Implementation`), and says in ``unsupported(call, platform)``
what it cannot serve and why. They all agree with :mod:`jax_attn.reference` (tested).
"""
