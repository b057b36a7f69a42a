"""The CUDA path without a GPU: the executor and kernels simulated against the reference, and every
kernel variant compiled to real PTX and SASS.

(a) ``cuda_sim_check.py`` runs the GPU executor (batching, staging slots, streams and events,
    shutdown) and its batch kernel under Numba's CUDA simulator in its own process (the simulator
    must be switched on before Numba is imported), from 16 threads at once; on a machine with a
    GPU it runs on the device instead. (b) Each kernel variant is compiled to PTX for sm_80 and
    sm_90 and assembled by ``ptxas -v``: errors, register spills, more registers than the
    budget, shared memory over the limit, or any fp64 instruction fail the test; registers and
    theoretical occupancy are printed. (c) The common path's inner loop, disassembled by
    ``nvdisasm``, may take at most a set number of instructions per source word.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nidaan.kernels.cuda import BLOCK, MODES, N_DESC

from peers import unavailable

HERE = Path(__file__).parent
#: Registers per thread: at 64 an SM still holds 1,024 threads (32 warps) of this kernel.
REGISTER_BUDGET = 64
#: Static shared memory the kernel may use (it uses none; the SM's limit is 228 KB on sm_90).
SHARED_LIMIT = 48 * 1024
#: SASS instructions per source word in the common path's unrolled inner loop (measured: 9.75
#: on sm_90 for 1 channel and 4 taps, see docs/kernels.md).
INSTRUCTIONS_PER_TAP = 10.0

VARIANTS = [
    # (channels, mode, fixed taps, source type)
    (1, "plain", 4, "uint16"),
    (1, "plain", 5, "uint16"),
    (1, "plain", 0, "uint16"),
    (3, "plain", 4, "uint16"),
    (1, "affine", 4, "int16"),
    (3, "affine", 2, "int16"),
    (1, "affine", 0, "uint32"),
    (2, "sigmoid", 4, "uint8"),
    (1, "table", 4, "uint16"),
    (4, "affine", 0, "int32"),
]


def signature(src: str, out: str) -> str:
    return (
        f"void({src}[::1], {out}[:, :, :, ::1], int32[:, ::1], float32[:, ::1], int32[::1], "
        "float32[::1], float32, float32, float32)"
    )


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or f"/usr/local/cuda/bin/{name}"
    if not os.path.exists(path):
        for p in sys.path:
            candidate = Path(p) / "nvidia" / "cu13" / "bin" / name
            if candidate.exists():
                return str(candidate)
        msg = f"{name} ({package}) is not installed: the PTX checks need it"
        unavailable(msg)
    return path


def occupancy(registers: int, threads_per_block: int = BLOCK[0] * BLOCK[1]) -> float:
    """Theoretical occupancy on sm_80/sm_90 from registers alone (no shared memory is used):
    registers are allocated per warp in units of 256, 64 K per SM, at most 64 warps and 32
    blocks an SM."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    warps_by_regs = 65536 // per_warp
    warps_per_block = threads_per_block // 32
    blocks = min(32, warps_by_regs // warps_per_block, 64 // warps_per_block)
    return blocks * warps_per_block / 64


def test_executor_and_kernel_match_reference_in_the_simulator_or_on_the_gpu() -> None:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    from nidaan.kernels.preprocess import cuda_available

    args = [sys.executable, str(HERE / "cuda_sim_check.py")]
    if cuda_available():
        args.append("--gpu")
    else:
        env.update(NUMBA_ENABLE_CUDASIM="1", NUMBA_DISABLE_JIT="1")
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=HERE)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") >= 21 and "FAIL" not in run.stdout, run.stdout


def _compile(tmp_path: Path, variant: tuple[int, str, int, str], cc: tuple[int, int], out: str):  # type: ignore[no-untyped-def]
    from numba import cuda

    from nidaan.kernels.cuda import batch_kernel

    n_ch, mode, taps, src = variant
    kernel = batch_kernel(n_ch, MODES[mode], taps)
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature(src, out), cc=cc)
    path = tmp_path / "k.ptx"
    path.write_text(ptx)
    cubin = tmp_path / "k.cubin"
    run = subprocess.run(
        [_tool("ptxas", "the CUDA toolkit"), f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(path),
         "-o", str(cubin)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return ptx, run, cubin


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}ch-{v[1]}-{v[2]}taps-{v[3]}")
def test_kernel_compiles_to_ptx_within_budget(
    tmp_path: Path, cc: tuple[int, int], variant: tuple[int, str, int, str]
) -> None:
    out = "float16" if variant[0] == 3 else "float32"
    ptx, run, _ = _compile(tmp_path, variant, cc, out)
    instructions = [
        line
        for line in ptx.splitlines()
        if line.strip() and not line.lstrip().startswith(("//", "."))
    ]
    fp64 = [line.strip() for line in instructions if ".f64" in line]
    assert fp64 == [], f"fp64 instructions the math does not need: {fp64[:5]}"
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "error" not in report.lower(), report
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and max(spills) == 0, report
    stack = [int(n) for n in re.findall(r"(\d+) bytes stack frame", report)]
    assert stack and max(stack) == 0, f"local arrays left in local memory: {report}"
    registers = int(re.search(r"Used (\d+) registers", report).group(1))  # type: ignore[union-attr]
    assert registers <= REGISTER_BUDGET, f"{registers} registers > {REGISTER_BUDGET}: {report}"
    smem = re.search(r"(\d+) bytes smem", report)
    assert smem is None or int(smem.group(1)) <= SHARED_LIMIT, report
    print(
        f"sm_{cc[0]}{cc[1]} {variant}: {registers} registers, 0 spills, "
        f"theoretical occupancy {occupancy(registers):.0%} ({BLOCK[0]}x{BLOCK[1]} blocks)"
    )


def inner_loop(sass: str) -> list[str]:
    """The instructions of the innermost loop that loads 16-bit source words: the basic block
    that ends with a branch back to its own label."""
    blocks: dict[str, list[str]] = {}
    label = "entry"
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            label = m.group(1)
            blocks[label] = []
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            blocks.setdefault(label, []).append(m.group(1))
    loops = [
        body
        for name, body in blocks.items()
        if body and "BRA" in body[-1] and f"`({name})" in body[-1]
        and any("LDG.E.U16" in i for i in body)
    ]  # fmt: skip
    assert loops, "no inner loop over 16-bit source words found"
    return max(loops, key=len)


def test_common_path_instructions_per_source_word(tmp_path: Path) -> None:
    """The 2048 -> 512 radiograph path (1 channel, LINEAR, 4 taps): instructions per word read."""
    _, run, cubin = _compile(tmp_path, (1, "plain", 4, "uint16"), (9, 0), "float32")
    assert run.returncode == 0, run.stdout + run.stderr
    sass = subprocess.run(
        [_tool("nvdisasm", "pip nvidia-cuda-nvdisasm"), "-c", str(cubin)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    body = inner_loop(sass)
    words = sum("LDG.E.U16" in i for i in body)
    per_tap = len(body) / words
    print(f"common path inner loop: {len(body)} instructions for {words} source words "
          f"= {per_tap:.2f} per word")  # fmt: skip
    assert per_tap <= INSTRUCTIONS_PER_TAP, "\n".join(body)
    # No 64-bit integer conversions of pixel values (I2F.U64) and no per-tap branches besides
    # the loop's own.
    assert not [i for i in body if "I2F" in i and "64" in i], body
    assert sum("BRA" in i for i in body) == 1, body


def test_descriptor_has_one_column_per_field() -> None:
    from nidaan.kernels import cuda as k

    columns = [v for n, v in vars(k).items() if n.startswith("D_")]
    assert sorted(columns) == list(range(N_DESC))
