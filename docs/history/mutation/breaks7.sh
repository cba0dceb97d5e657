#!/bin/sh
# kernels/lowrank.py survivors: the Triton Q8_0 edit's call, run only by Triton's interpreter (TRITON_INTERPRET=1,
# the child run of test_interpreted_kernels, left out of the shard for its time): made as breaks against it.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/kernels/lowrank.py
K="tests/test_kernels_lowrank.py -k triton_edit_to_q8_0_is_byte_identical"
export TRITON_INTERPRET=1
$B $F 'edit_to_q8_0_triton_kernel(data.contiguous(), qtype' 'edit_to_q8_0_triton_kernel(None, qtype' -- $K
$B $F 'U.float().contiguous(), V.float().contiguous(), scale)' 'V.float().contiguous(), scale)' -- $K
$B $F 'U.float().contiguous(), V.float().contiguous(), scale)' 'U.float().contiguous(), V.float().contiguous(), )' -- $K
