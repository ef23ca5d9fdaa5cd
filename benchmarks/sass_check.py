"""Compile the Triton kernels for an H100 (sm_90) without a GPU and count their instructions.

A prediction aid, not a measurement: it needs only pip's triton (which bundles ptxas and
cuobjdump). For each kernel and dtype it reports whether global loads and stores are
128-bit vectors, the layout conversions through shared memory, and the instructions per
element of the straight-line element kernels, to compare with the budget a memory-bound
kernel has at the copy floor. Writes benchmarks/results/sass.md::

    python benchmarks/sass_check.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_dropout.kernels import triton_dropconnect as tdc
from lightning_dropout.kernels import triton_dropout as td

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
THREADS = 4 * 32  # Triton's default num_warps = 4


def compile_kernel(
    fn: Any, signature: dict[str, str], constants: dict[str, Any], loop: bool = False
) -> dict[str, Any]:
    # What the JIT sees for aligned tensors and sizes divisible by 16.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(signature.items())
        if kind.startswith("*") or (kind == "i32" and name != "rows_per_mask")
    }
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs), target=TARGET
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run(
            [str(TOOLS / "cuobjdump"), "-sass", cubin.name], capture_output=True, text=True
        ).stdout
    return {
        "instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M)),
        "loads": sorted(set(re.findall(r"LDG\.E[.\w]*", sass))),
        "stores": sorted(set(re.findall(r"STG\.E[.\w]*", sass))),
        "layout conversions": kernel.asm["ttgir"].count("ttg.convert_layout"),
        "usual path": usual_path_length(sass, loop),
    }


def usual_path_length(sass: str, loop: bool) -> int:
    """Instructions on the kernel's usual path: code that forward branches skip (the slow
    argument reduction of sin/cos, the DropConnect tie-breaking draws: both rare) is left
    out. With ``loop``, only the longest loop (the span of the longest backward branch)
    is counted: one trip through it.
    """
    code = [
        (int(m.group(1), 16), m.group(2), m.group(3))
        for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^\n]*)", sass, re.M)
    ]
    branches = [
        (address, int(target.group(1), 16))
        for address, op, rest in code
        if op.startswith("BRA") and (target := re.search(r"0x([0-9a-f]+)", rest))
    ]
    start, end = code[0][0], code[-1][0]
    if loop:
        start, end = max(((t, a) for a, t in branches if t < a), key=lambda span: span[1] - span[0])
    skipped = [(address, target) for address, target in branches if start <= address < target <= end]
    return sum(
        1
        for address, _, _ in code
        if start <= address <= end and not any(a < address < t for a, t in skipped)
    )


def main() -> None:
    rows = []
    for dtype in ("fp32", "bf16", "fp16"):
        data = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "seed_ptr": "*i64"}
        element = [
            (
                "dropout",
                td._dropout_kernel,
                {**data, "p_ptr": "*fp64", "n": "i32", "INVERTED": "constexpr", "BLOCK": "constexpr"},
                {"INVERTED": True, "BLOCK": td.BLOCK},
                td.BLOCK,
            ),
            (
                "gaussian",
                td._gaussian_kernel,
                {**data, "sigma_ptr": "*fp64", "n": "i32", "BLOCK": "constexpr"},
                {"BLOCK": td.BLOCK},
                td.BLOCK,
            ),
            (
                "channel (4 x 1024 tile)",
                td._channel_kernel,
                {
                    **data,
                    "p_ptr": "*fp64",
                    "rows": "i32",
                    "row_size": "i32",
                    "INVERTED": "constexpr",
                    "ROWS": "constexpr",
                    "COLS": "constexpr",
                },
                {"INVERTED": True, "ROWS": 4, "COLS": 1024},
                4096,
            ),
            (
                "channels-last (16 x 256 tile)",
                td._channel_last_kernel,
                {
                    **data,
                    "p_ptr": "*fp64",
                    "channels": "i32",
                    "pixels": "i32",
                    "INVERTED": "constexpr",
                    "PIXELS": "constexpr",
                    "CHANNELS": "constexpr",
                },
                {"INVERTED": True, "PIXELS": 16, "CHANNELS": 256},
                4096,
            ),
        ]
        for name, fn, signature, constants, elements in element:
            stats = compile_kernel(fn, signature, constants)
            stats["instructions per element"] = round(stats["usual path"] / (elements / THREADS), 1)
            rows.append({"kernel": name, "dtype": dtype, **stats})
    common = {
        "seed_ptr": "*i64",
        "p_ptr": "*fp64",
        "out_features": "i32",
        "in_features": "i32",
        "rows_per_mask": "i32",
        "OUT_TILE": "constexpr",
        "K_TILE": "constexpr",
    }
    tiles = {"OUT_TILE": tdc.OUT_TILE, "K_TILE": tdc.K_TILE}
    bf16 = "*bf16"
    for name, fn, signature, constants in [
        (
            "drop-connect forward",
            tdc._forward_kernel,
            {
                "x_ptr": bf16,
                "w_ptr": bf16,
                "b_ptr": bf16,
                "y_ptr": bf16,
                **common,
                "HAS_BIAS": "constexpr",
                "EVEN": "constexpr",
            },
            {**tiles, "HAS_BIAS": True, "EVEN": True},
        ),
        (
            "drop-connect grad input",
            tdc._grad_input_kernel,
            {"g_ptr": bf16, "w_ptr": bf16, "dx_ptr": bf16, **common, "EVEN": "constexpr"},
            {**tiles, "EVEN": True},
        ),
        (
            "drop-connect grad weight",
            tdc._grad_weight_kernel,
            {
                "g_ptr": bf16,
                "x_ptr": bf16,
                "dw_ptr": bf16,
                "seed_ptr": "*i64",
                "p_ptr": "*fp64",
                "rows": "i32",
            }
            | {k: v for k, v in common.items() if k not in ("seed_ptr", "p_ptr")},
            tiles,
        ),
    ]:
        stats = compile_kernel(fn, signature, constants, loop=True)
        # Each trip through the loop handles one OUT_TILE x K_TILE tile of mask entries.
        per_thread = tdc.OUT_TILE * tdc.K_TILE / THREADS
        stats["instructions per mask entry"] = round(stats["usual path"] / per_thread, 1)
        rows.append({"kernel": name, "dtype": "bf16", **stats})
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [
        "# Triton kernels compiled for sm_90 (no GPU): static SASS statistics",
        "",
        f"triton {triton.__version__}; a prediction aid, not a measurement. 'usual path' counts the",
        "instructions a thread runs when the rarely taken branches are not (the slow argument",
        "reduction of sin/cos in the Gaussian kernel, the tie-breaking draws of DropConnect); the",
        "element kernels' per-element count divides it by the elements a thread handles, the",
        "DropConnect kernels count one trip through their main loop per mask entry of the tile.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    out = Path(__file__).parent / "results" / "sass.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
