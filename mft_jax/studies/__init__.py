"""Studies around training: `sweep` (grids of runs, each selected on dev and evaluated), `landscape` (loss lines,
surfaces and sharpness between models), `hessian` (Hessian-vector products, Lanczos, Hutchinson) and `memplan`
(a step's memory, work and roofline per device, compiled ahead of time for a target: the `plan` command)."""
