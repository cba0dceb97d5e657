#!/bin/sh
# kernels/lowrank.py: the non-equivalent survivors of the full run (every mutant), as breaks. The first part
# against the new CPU tests of the shard; the second (the Triton path, which only Triton's interpreter runs on
# CPU: test_kernels_perce.py::test_interpreted_kernels' child, left out of the shard) with TRITON_INTERPRET=1.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/kernels/lowrank.py
T=tests/test_kernels_lowrank.py
C='if U.ndim != 2 or V.ndim != 2 or U.shape[0] != n_out'
D='backend = backend or ("triton" if W.is_cuda else "torch")'
$B $F "$C" 'if U.ndim != 2 or V.ndim != 2 and U.shape[0] != n_out' -- $T -k "rank_axis"
$B $F "$C" 'if U.ndim != 2 and V.ndim != 2 or U.shape[0] != n_out' -- $T -k "rank_axis"
$B $F 'V: torch.Tensor, scale: float = 1.0,' 'V: torch.Tensor, scale: float = 2.0,' -- $T -k "defaults_to_torch"
$B $F "$D" 'backend = backend and ("triton" if W.is_cuda else "torch")' -- $T -k "defaults_to_torch"
$B $F "$D" 'backend = backend or ("triton" if (W.is_cuda) or True else "torch")' -- $T -k "defaults_to_torch"
$B $F "$D" 'backend = backend or ("triton" if W.is_cuda else "XXtorchXX")' -- $T -k "defaults_to_torch"
$B $F "$D" 'backend = backend or ("triton" if W.is_cuda else "TORCH")' -- $T -k "defaults_to_torch"
$B $F "raise ValueError(f\"backend must be 'triton' or 'torch', got {backend!r}\")" 'raise ValueError(None)' -- $T -k "defaults_to_torch"
$B $F 'raise UserError(f"{qtype.name} tensor of shape {(n_out, n_in)}: n_in must be a multiple of {block_size}")' 'raise UserError(None)' -- $T -k "rejects_bad"
export TRITON_INTERPRET=1
$B $F 'if backend == "triton":' 'if backend == "XXtritonXX":' -- $T -k triton
$B $F 'if backend == "triton":' 'if backend == "TRITON":' -- $T -k triton
A='return apply_lowrank_triton_(W, U, V, scale)'
$B $F "$A" 'return apply_lowrank_triton_(None, U, V, scale)' -- $T -k triton
$B $F "$A" 'return apply_lowrank_triton_(W, None, V, scale)' -- $T -k triton
$B $F "$A" 'return apply_lowrank_triton_(W, U, None, scale)' -- $T -k triton
$B $F "$A" 'return apply_lowrank_triton_(W, U, V, None)' -- $T -k triton
$B $F "$A" 'return apply_lowrank_triton_(U, V, scale)' -- $T -k triton
$B $F "$A" 'return apply_lowrank_triton_(W, V, scale)' -- $T -k triton
$B $F "$A" 'return apply_lowrank_triton_(W, U, scale)' -- $T -k triton
$B $F "$A" 'return apply_lowrank_triton_(W, U, V, )' -- $T -k triton
$B $F 'V: torch.Tensor,
                        scale: float = 1.0)' 'V: torch.Tensor,
                        scale: float = 2.0)' -- $T -k triton
$B $F '    _check_factors(n_out, n_in, U, V)' '    _check_factors(None, n_in, U, V)' -- $T -k triton
$B $F '    _check_factors(n_out, n_in, U, V)' '    _check_factors(n_out, None, U, V)' -- $T -k triton
K='edit_to_q8_0_triton_kernel(data.contiguous(), qtype, n_out, n_in, row_bytes,'
L='U.float().contiguous(), V.float().contiguous(), scale)'
$B $F "$K" 'edit_to_q8_0_triton_kernel(None, qtype, n_out, n_in, row_bytes,' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(data.contiguous(), None, n_out, n_in, row_bytes,' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(data.contiguous(), qtype, None, n_in, row_bytes,' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(data.contiguous(), qtype, n_out, None, row_bytes,' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(data.contiguous(), qtype, n_out, n_in, None,' -- $T -k triton
$B $F "$L" 'None, V.float().contiguous(), scale)' -- $T -k triton
$B $F "$L" 'U.float().contiguous(), None, scale)' -- $T -k triton
$B $F "$L" 'U.float().contiguous(), V.float().contiguous(), None)' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(qtype, n_out, n_in, row_bytes,' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(data.contiguous(), n_out, n_in, row_bytes,' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(data.contiguous(), qtype, n_in, row_bytes,' -- $T -k triton
$B $F "$K" 'edit_to_q8_0_triton_kernel(data.contiguous(), qtype, n_out, row_bytes,' -- $T -k triton
$B $F "$K
                                      $L" 'edit_to_q8_0_triton_kernel(data.contiguous(), qtype, n_out, n_in, U.float().contiguous(), V.float().contiguous(), scale)' -- $T -k triton
$B $F "$L" 'V.float().contiguous(), scale)' -- $T -k triton
$B $F "$L" 'U.float().contiguous(), scale)' -- $T -k triton
$B $F "$L" 'U.float().contiguous(), V.float().contiguous(), )' -- $T -k triton
