"""What an optimized HLO module does per run of its entry: flops, HBM bytes, collectives and kernels.

Read from `compiled.as_text()` of any backend. Every instruction is counted as many times as it runs: the
instructions of a while loop's body times its known trip count (the micro-batch `lax.scan`), fused and called
computations as often as their caller. XLA's own `cost_analysis` counts a loop body once and is missing on GPU,
hence this count.

- flops: 2 x output elements x contracted size of every dot and convolution (fused or not), plus the attention
  kernels from their shapes (cuDNN flash attention: 4 B H L S Dh forward, 10 backward; splash: 4 forward,
  6 dq, 8 dkv; halved when causal: the kernels skip the masked blocks).
- bytes: operands + outputs of every top-level (unfused) instruction: an estimate of HBM traffic; an in-place
  dynamic-update-slice counts its update, not its buffer, and an asynchronous slice its slice
  (`special_traffic`).
- collectives: kind, dtype, shape (the result), group size, count, and the bytes one device sends on a ring
  (the TPU compiler's reduce-scatter is a fusion named all-reduce-scatter: counted as one reduce-scatter):
  all-gather (g-1)/g x result, reduce-scatter (g-1) x result, all-reduce 2 (g-1)/g x result, all-to-all
  (g-1)/g x result, collective-permute the result.
- kernels: custom calls by target, and attention kernels by kind (forward, backward).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
         "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota", "add-dependency", "opt-barrier"}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")


@dataclasses.dataclass
class Instr:
    name: str
    shapes: list[tuple[str, tuple[int, ...]]]  # the result: one (dtype, dims) or a tuple's elements
    op: str
    operands: list[str]
    line: str
    is_tuple: bool = False

    def bytes(self, shapes=None) -> float:
        return sum(BYTES[d] * math.prod(dims) for d, dims in (self.shapes if shapes is None else shapes))


def _split_operands(rest: str) -> tuple[list[str], str]:
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    return re.findall(r"%([\w.\-]+)", rest[:i - 1]), rest[i:]


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
    """({computation name: its instructions}, the entry computation's name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head and " = " not in line.split("{")[0]:
            current = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
            continue
        m = _INSTR.match(line)
        if m is None or current is None:
            continue
        operands, _ = _split_operands(m.group(4))
        shapes = [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(m.group(2))]
        current.append(Instr(m.group(1), shapes, m.group(3), operands, line, m.group(2).startswith("(")))
    return comps, entry


def _through_copies(instr: Instr | None, table: dict[str, Instr]) -> Instr | None:
    while instr is not None and instr.op in ("copy", "copy-start", "copy-done", "bitcast") and instr.operands:
        instr = table.get(instr.operands[0])
    return instr


def _constant(instr: Instr | None) -> int | None:
    m = re.search(r"constant\((-?\d+)\)", instr.line) if instr is not None and instr.op == "constant" else None
    return int(m.group(1)) if m else None


def _gte_index(instr: Instr | None) -> int | None:
    m = re.search(r"index=(\d+)", instr.line) if instr is not None and instr.op == "get-tuple-element" else None
    return int(m.group(1)) if m else None


def trip_count(instr: Instr, comps: dict[str, list[Instr]], caller: dict[str, Instr]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count where the backend records it (GPU), else read from a
    counted loop's shape (TPU): condition `i < N` on tuple element k, body `i + s`, initial value a constant."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", instr.line)
    body = re.search(r"body=%?([\w.\-]+)", instr.line)
    if not cond or not body or not instr.operands:
        return None
    table = {i.name: i for i in comps.get(cond.group(1), [])}
    root = next((i for i in comps.get(cond.group(1), []) if i.line.lstrip().startswith("ROOT")), None)
    if root is None or root.op != "compare" or "direction=LT" not in root.line or len(root.operands) != 2:
        return None
    k, limit = _gte_index(table.get(root.operands[0])), _constant(table.get(root.operands[1]))
    body_table = {i.name: i for i in comps.get(body.group(1), [])}
    body_root = next((i for i in comps.get(body.group(1), []) if i.line.lstrip().startswith("ROOT")), None)
    init_tuple = caller.get(instr.operands[0])
    if k is None or limit is None or body_root is None or body_root.op != "tuple" or init_tuple is None \
            or init_tuple.op != "tuple" or k >= len(body_root.operands) or k >= len(init_tuple.operands):
        return None
    step = body_table.get(body_root.operands[k])
    if step is None or step.op != "add" or len(step.operands) != 2:
        return None
    a, b = (_through_copies(body_table.get(o), body_table) for o in step.operands)
    stride = _constant(b) if _gte_index(a) == k else _constant(a) if _gte_index(b) == k else None
    start = _constant(_through_copies(caller.get(init_tuple.operands[k]), caller))
    if not stride or start is None or stride <= 0:
        return None
    return max(0, -(-(limit - start) // stride))


def _called(instr: Instr) -> list[tuple[str, str]]:
    """(computation, role) pairs an instruction runs: role body / fused / called."""
    line = instr.line
    if instr.op == "while":
        return [(re.search(r"body=%?([\w.\-]+)", line).group(1), "body")]
    if instr.op == "fusion":
        return [(re.search(r"calls=%?([\w.\-]+)", line).group(1), "fused")]
    if instr.op == "call" or instr.op.endswith("-start") and "calls=" in line:
        m = re.search(r"(?:to_apply|calls)=%?([\w.\-]+)", line)
        return [(m.group(1), "called")] if m else []
    if instr.op == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", line)
        return [(c.strip().lstrip("%"), "called") for c in m.group(1).split(",")] if m else []
    return []


def _dot_flops(instr: Instr, table: dict[str, Instr]) -> float:
    """dot: the lhs's contracting dims; convolution (TPU writes matmuls as 1x1 ones): the lhs's feature dim
    ('f' in dim_labels) times the window, each window dim at most the lhs's size along it."""
    lhs = table.get(instr.operands[0]) if instr.operands else None
    if lhs is None or not lhs.shapes or not instr.shapes:
        return 0.0
    dims = lhs.shapes[0][1]
    if instr.op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.line)
        contracted = math.prod(dims[int(i)] for i in m.group(1).split(",") if i) if m else 0
    else:
        labels = re.search(r"dim_labels=(\w+)_", instr.line)
        window = re.search(r"window=\{size=([\dx]+)", instr.line)
        if labels is None or "f" not in labels.group(1) or len(labels.group(1)) != len(dims):
            return 0.0
        groups = re.search(r"feature_group_count=(\d+)", instr.line)
        contracted = dims[labels.group(1).index("f")] // (int(groups.group(1)) if groups else 1)
        # window positions over padding or over the holes of a dilated input multiply zeros: per spatial dim at
        # most the input's size and one in lhs_dilate count (the TPU compiler writes a decode step's per-head
        # projection as a size-4 window padded 3_3, a batched attention dot as a size-B window over an input
        # dilated by B)
        spatial = {int(c): dims[i] for i, c in enumerate(labels.group(1)) if c.isdigit()}
        sizes = [int(x) for x in window.group(1).split("x")] if window else []
        dilate = re.search(r"lhs_dilate=([\dx]+)", instr.line)
        dilate = [int(x) for x in dilate.group(1).split("x")] if dilate else [1] * len(sizes)
        contracted *= math.prod(min(w, spatial.get(k, w), -(-w // dilate[k])) for k, w in enumerate(sizes))
    return 2.0 * math.prod(instr.shapes[0][1]) * contracted


def _float_operands(line: str) -> list[tuple[int, ...]]:
    """The floating-point operands' shapes of a custom call, from its operand layout constraints."""
    m = re.search(r"operand_layout_constraints=\{(.*?)\}, [a-z_]+=", line)
    return [tuple(int(x) for x in dims.split(",") if x) for dtype, dims in _SHAPE.findall(m.group(1))
            if dtype in ("bf16", "f16", "f32")] if m else []


def attention_kernel(instr: Instr) -> tuple[str, float] | None:
    """("forward" | "backward", flops) of an attention kernel call, or None for other instructions."""
    target = re.search(r'custom_call_target="([^"]+)"', instr.line)
    if instr.op != "custom-call" or target is None:
        return None
    if target.group(1).startswith("__cudnn$fmha"):
        dims = re.search(r'"intermediate_tensor_shape":\{"element_type":"?\w+"?,\s*"dimensions":\[([^\]]*)\]',
                         instr.line.replace(" ", ""))
        b, h, l, s = (int(x.strip('"')) for x in dims.group(1).split(",")) if dims else (0, 0, 0, 0)
        d = instr.shapes[0][1][-1]
        causal = 0.5 if re.search(r'"mask_type":"CAUSAL', instr.line.replace(" ", "")) else 1.0
        backward = "Backward" in target.group(1)
        return ("backward" if backward else "forward"), (10 if backward else 4) * b * h * l * s * d * causal
    kind = re.match(r"splash_mha_(fwd|dq|dkv)", instr.name)
    if target.group(1) == "tpu_custom_call" and kind:
        q_k = [(1,) * (4 - len(s)) + s for s in _float_operands(instr.line) if len(s) in (3, 4)][:2]
        if len(q_k) < 2:  # [B, H, L, Dh] q and k ([H, L, Dh] with one row per device: the vmap is gone)
            return ("forward" if kind.group(1) == "fwd" else "backward"), 0.0
        (b, h, l, d), (_, _, s, _) = q_k
        factor = {"fwd": 4, "dq": 6, "dkv": 8}[kind.group(1)]
        return ("forward" if kind.group(1) == "fwd" else "backward"), factor * b * h * l * s * d * 0.5
    return None


def _group_size(line: str) -> int:
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)  # the TPU compiler's form
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota:
        return int(iota.group(2))
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if groups:
        return len(groups.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{([^}]*)\}", line)
    return 2 if pairs else 1


def _ring_bytes(kind: str, result_bytes: float, g: int) -> float:
    if g <= 1:
        return 0.0
    return {"all-gather": (g - 1) / g, "reduce-scatter": g - 1, "all-reduce": 2 * (g - 1) / g,
            "all-to-all": (g - 1) / g, "collective-permute": 1.0}[kind] * result_bytes


def special_traffic(instr: Instr, comps: dict[str, list[Instr]], table: dict[str, Instr]) -> float | None:
    """HBM bytes of the instructions whose operands + result overstate their traffic, else None:
    - a dynamic-update-slice that writes into its buffer in place (a bare one, or a fusion whose root is one
      updating a parameter of the fusion): the other operands read and the update written; the buffer is
      neither read nor rewritten (a KV cache's one new slot per step);
    - an asynchronous slice (slice-start: the TPU compiler's prefetch of a weight's tile; its result tuple
      echoes the whole operand): the slice read and written, as a slice counts in XLA's cost analysis."""
    if instr.op == "slice-start" and len(instr.shapes) > len(instr.operands):
        return 2 * instr.bytes(instr.shapes[len(instr.operands):len(instr.operands) + 1])
    if instr.op == "dynamic-update-slice" and len(instr.operands) >= 2:
        update = table.get(instr.operands[1])
        return None if update is None else 2 * update.bytes()
    if instr.op != "fusion" or instr.is_tuple:
        return None
    fused = comps.get(_called(instr)[0][0], [])
    root = next((i for i in fused if i.line.lstrip().startswith("ROOT")), None)
    if root is None or root.op != "dynamic-update-slice" or len(root.operands) < 2:
        return None
    inner = {i.name: i for i in fused}
    buffer, update = inner.get(root.operands[0]), inner.get(root.operands[1])
    index = re.search(r"parameter\((\d+)\)", buffer.line) if buffer is not None and buffer.op == "parameter" else None
    if index is None or update is None or int(index.group(1)) >= len(instr.operands):
        return None
    others = [o for k, o in enumerate(instr.operands) if k != int(index.group(1))]
    return sum(table[o].bytes() for o in others if o in table) + update.bytes()


@dataclasses.dataclass
class Summary:
    flops: float = 0.0
    bytes: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)  # (kind, dtype, shape, group) -> [count, bytes sent]
    custom_calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    attention: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # forward/backward
    attention_flops: float = 0.0
    loops: list = dataclasses.field(default_factory=list)  # trip counts of the while loops met (None: unknown)
    flops_loops_once: float = 0.0  # every loop body counted once, as XLA's cost_analysis counts
    bytes_loops_once: float = 0.0

    def collective_rows(self) -> list[dict]:
        rows = [{"kind": k[0], "dtype": k[1], "shape": list(k[2]), "group": k[3], "count": c, "bytes_sent": b}
                for k, (c, b) in self.collectives.items()]
        return sorted(rows, key=lambda r: -r["bytes_sent"])

    @property
    def collective_bytes(self) -> float:
        return sum(b for _, b in self.collectives.values())

    def to_dict(self) -> dict:
        return {"flops": self.flops, "flops_loops_once": self.flops_loops_once, "bytes": self.bytes,
                "bytes_loops_once": self.bytes_loops_once,
                "attention_flops": self.attention_flops,
                "collective_bytes": self.collective_bytes, "collectives": self.collective_rows(),
                "custom_calls": dict(self.custom_calls), "attention_kernels": dict(self.attention),
                "loops": self.loops}


def summarize(text: str) -> Summary:
    """Flops, bytes, collectives and kernels of one run of the module's entry computation (module docstring)."""
    comps, entry = parse(text)
    out = Summary()

    def record(kind: str, shapes, group: int, times: float):
        for dtype, dims in shapes:
            key = (kind, dtype, dims, group)
            count, sent = out.collectives.get(key, (0, 0.0))
            out.collectives[key] = (count + times,
                                    sent + times * _ring_bytes(kind, BYTES[dtype] * math.prod(dims), group))

    def visit(name: str, times: float, fused: bool, once: float = 1.0):
        instrs = comps.get(name, [])
        table = {i.name: i for i in instrs}
        for instr in instrs:
            if instr.op in ("dot", "convolution"):
                flops = _dot_flops(instr, table)
                out.flops += times * flops
                out.flops_loops_once += once * flops
            kernel = attention_kernel(instr)
            if kernel:
                out.attention[kernel[0]] += times
                out.flops += times * kernel[1]
                out.flops_loops_once += once * kernel[1]
                out.attention_flops += times * kernel[1]
            if instr.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', instr.line)
                out.custom_calls[target.group(1) if target else "?"] += times
            base = instr.op.removesuffix("-start")
            callees = _called(instr)
            if instr.op == "fusion" and callees[0][0].startswith("all-reduce-scatter"):
                # the TPU compiler's reduce-scatter: a fusion of an all-reduce and this device's slice of it
                inner = next((i for i in comps.get(callees[0][0], []) if i.op == "all-reduce"), None)
                record("reduce-scatter", instr.shapes, _group_size(inner.line) if inner else 1, times)
                callees = []
            elif base in COLLECTIVES:
                shapes = instr.shapes
                if instr.op.endswith("-start"):  # (operands, results, scalar contexts): the results
                    arrays = [s for s in shapes if s[1]] or shapes
                    shapes = arrays[len(arrays) // 2:]
                record(base, shapes, _group_size(instr.line), times)
            if not fused and instr.op not in _NO_TRAFFIC and not instr.op.endswith("-done"):
                traffic = special_traffic(instr, comps, table)
                if traffic is None:
                    traffic = instr.bytes() + sum(table[o].bytes() for o in instr.operands if o in table)
                out.bytes += times * traffic
                out.bytes_loops_once += once * traffic
            for callee, role in callees:
                n = 1
                if role == "body":
                    n = trip_count(instr, comps, table)
                    out.loops.append(n)
                    n = 1 if n is None else n
                visit(callee, times * n, fused or role == "fused", once)

    visit(entry, 1, False)
    return out


def largest_arrays(text: str, top: int = 5) -> list[dict]:
    """The largest arrays the program materializes (per device), grouped by shape and source op: instructions
    outside fused (and other `calls=`) computations, without parameters, tuples and bitcasts (views)."""
    comps, _ = parse(text)
    called = set(re.findall(r"\bcalls=%?([\w.\-]+)", text))
    groups: dict[tuple, list] = {}
    for name, instrs in comps.items():
        for instr in instrs if name not in called else []:
            if instr.is_tuple or len(instr.shapes) != 1 or instr.op in (
                    "parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
                continue
            dtype, dims = instr.shapes[0]
            source = re.search(r'op_name="([^"]*)"', instr.line)
            key = (f"{dtype}{list(dims)}", instr.op, source.group(1)[-120:] if source else "")
            groups.setdefault(key, [int(math.prod(dims) * BYTES[dtype]), 0])[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"bytes": n, "count": c, "shape": k[0], "op": k[1], "source": k[2]} for k, (n, c) in ranked]
