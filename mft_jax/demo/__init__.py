"""The offline demo: `protocol` (the paper's protocol end to end, the `mft-jax demo` command), `task` (its
synthetic arithmetic task, also the `arith` eval task's scorer) and `report` (its table and figures)."""
