"""Sanitizer fuzzing of the crop-decode kernel: mutated JPEGs through its C entry points under ASan and UBSan.

    python tools/fuzz_kernel.py [--count 100000] [--seed 0] [--jobs 2] [--keep DIR]

The kernel (dailymae_jax/data/_jpeg_crop.c, _jpeg_index.c) parses untrusted bytes in C. This tool builds it a
second time, with gcc (or $CC) under AddressSanitizer and UndefinedBehaviorSanitizer (-fsanitize=address,undefined
-fno-sanitize-recover=all, and -fno-wrapv as setup.py builds it: a signed overflow is a report, not a wrap),
linked to the standalone driver tools/fuzz_kernel_driver.c. The driver's corpus is made here from the sample
dataset's source photographs (dailymae_jax.data.sample): 4:2:0, 4:4:4, 4:2:2 and grayscale files, some with
restart markers (the kernel splices them), some with the crop index the writer adds (its own Huffman decoder
seeks in them), some progressive (libjpeg decodes those), at sizes from one MCU to the sample's 500 px, and two
crafted files that are decoded whole before the cases (DC predictors summed past INT32_MAX; a scan header cut at
its length field). Case k of a run is a function of (seed, k): the driver mutates one base file (see its header
for the mutations) and feeds it to dm_decode_crop with several boxes, output sizes and flags, and to
dm_index_add; it also builds Huffman lookup tables from a random table, beyond what libjpeg lets through. Errors
the kernel returns are the expected answer to bad bytes; a sanitizer report, a crash or a hang ends the run.
It lives in tools/ because it is a developer's check, not part of the package: tests/tools/test_fuzz_kernel.py
runs 5,000 cases in the test suite, `make fuzz` 100,000.

Cases are split over --jobs driver processes. Prints the count, the time and the cases per second; exit 1 with
the report's first lines and the command that replays the failing case (--dump writes its bytes), 2 for bad
arguments or a toolchain that cannot build sanitized code. libjpeg itself is the system's uninstrumented library:
the sanitizers watch our code and the buffers it hands libjpeg, not libjpeg's own reads.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import shutil
import subprocess
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

if not __package__:  # run as a script: the repository root holds dailymae_jax
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "dailymae_jax" / "data"
DRIVER_SOURCE = Path(__file__).with_name("fuzz_kernel_driver.c")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-wrapv"]
# A report ends the process with exit code 86 (the driver's own errors are 2); leaks are reports too. Allocations
# over 256 MB (libjpeg's buffers for a crafted header's 65500 x 65500 px) come back NULL, which libjpeg reports as
# out of memory: ASan would otherwise spend seconds poisoning their shadow memory, for nothing our code does.
SANITIZER_ENV = {"ASAN_OPTIONS": ("abort_on_error=0:exitcode=86:detect_leaks=1:allocator_may_return_null=1:"
                                  "max_allocation_size_mb=256"),
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=86"}
CASE_TIMEOUT_S = 60  # per driver process, per 1,000 cases


class FuzzError(Exception):
    """A sanitizer report, crash or hang; the message names the case and how to replay it."""


def _libjpeg_flags(flag: str, default: list[str]) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, "libjpeg"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return default
    return shlex.split(out)


def build_driver(directory: Path) -> Path:
    """The driver linked with the kernel, both under ASan and UBSan; SystemExit(2) naming what the compiler said.
    Its two translation units compile side by side (two cores: the build is most of a short run's time)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or "cc"
    binary = directory / "fuzz_kernel_driver"
    compile_flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-std=gnu11", "-DDM_NO_PYTHON", *SANITIZE,
                     f"-I{KERNEL_DIR}", *_libjpeg_flags("--cflags", [])]
    objects = [directory / "driver.o", directory / "jpeg_crop.o"]
    steps = [[[compiler, *compile_flags, "-c", str(source), "-o", str(target)]
              for source, target in zip((DRIVER_SOURCE, KERNEL_DIR / "_jpeg_crop.c"), objects)],
             [[compiler, *SANITIZE, *map(str, objects), "-o", str(binary), *_libjpeg_flags("--libs", ["-ljpeg"]),
               "-lpthread", "-lm"]]]
    problem = None
    for commands in steps:  # compile, then link
        try:
            running = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                       for c in commands]
        except OSError as error:
            problem = f"cannot run the C compiler {compiler!r}: {error}"
            break
        for process in running:
            errors = process.communicate()[1]
            if process.returncode and problem is None:
                problem = f"the sanitizer build failed ({compiler}: {(errors.strip().splitlines() or ['?'])[-1]})"
        if problem:
            break
    if problem is None:
        return binary
    print(f"error: {problem}", file=sys.stderr)
    raise SystemExit(2)


def jpeg_bytes(rgb: np.ndarray, *, subsampling: int = 2, restart_rows: int = 0, restart_blocks: int = 0,
               progressive: bool = False, gray: bool = False, quality: int = 90) -> bytes:
    """JPEG bytes from PIL (libjpeg): subsampling 0/1/2 = 4:4:4/4:2:2/4:2:0, restart markers every that many
    MCU rows or MCUs."""
    image = Image.fromarray(rgb).convert("L") if gray else Image.fromarray(rgb)
    options = {"quality": quality, "progressive": progressive}
    if not gray:
        options["subsampling"] = subsampling
    if restart_rows:
        options["restart_marker_rows"] = restart_rows
    if restart_blocks:
        options["restart_marker_blocks"] = restart_blocks
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def dc_overflow_jpeg(height: int = 2056, width: int = 2048) -> bytes:
    """A valid grayscale JPEG whose every block adds +32767 to the DC predictor (a one-code DC table for
    difference size 15, all value bits set, then end of block): past 65,536 blocks the sum leaves int32."""
    header = (_segment(0xDB, b"\x00" + b"\x01" * 64)
              + _segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
              + _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + bytes([15]))  # DC: code 0 -> size 15
              + _segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + bytes([0]))  # AC: code 0 -> end of block
              + _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"))
    bits = ("0" + "1" * 15 + "0") * (((height + 7) // 8) * ((width + 7) // 8))
    bits += "1" * (-len(bits) % 8)
    scan = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")
    return b"\xff\xd8" + header + scan + b"\xff\xd9"


def sos_at_end_jpeg(jpeg: bytes) -> bytes:
    """The header of a JPEG with restart markers, up to a scan header whose length field says 2 (no payload),
    which ends the file: the kernel's restart splicing reads the scan's component count from there."""
    sos = jpeg.index(b"\xff\xda")
    return jpeg[:sos] + b"\xff\xda\x00\x02"


def make_corpus(directory: Path) -> list[Path]:
    """Base JPEGs cut from the sample's source photographs, one per decode path and layout; their paths."""
    from dailymae_jax.data.jpeg_crop import add_crop_index
    from dailymae_jax.data.sample import source_photograph_paths

    photos = {name: Image.open(path).convert("RGB") for name, path in source_photograph_paths().items()}
    names = sorted(photos)
    # (height, width): one MCU, odd sizes that leave partial MCUs, the sample's own geometry.
    sizes = [(8, 8), (16, 16), (17, 33), (40, 24), (64, 96), (75, 131), (120, 160), (333, 500), (500, 375)]
    files: dict[str, bytes] = {}
    for i, (height, width) in enumerate(sizes):
        rgb = np.asarray(photos[names[i % len(names)]].resize((width, height), Image.Resampling.BICUBIC))
        for subsampling in (0, 1, 2):
            files[f"{height}x{width}_s{subsampling}"] = jpeg_bytes(rgb, subsampling=subsampling)
        files[f"{height}x{width}_gray"] = jpeg_bytes(rgb, gray=True)
        # Restart markers: every MCU row (spliced by rows), every MCU (by rows and columns, the writer's choice).
        files[f"{height}x{width}_rst1"] = jpeg_bytes(rgb, restart_rows=1, subsampling=2 - i % 3)
        files[f"{height}x{width}_rst_mcu"] = jpeg_bytes(rgb, restart_blocks=1, subsampling=i % 3)
        if height * width <= 120 * 160:
            files[f"{height}x{width}_progressive"] = jpeg_bytes(rgb, progressive=True)
        for spacing, variant in ((8, "s2"), (64, "s0"), (16, "gray")):
            files[f"{height}x{width}_{variant}_index{spacing}"] = add_crop_index(
                files[f"{height}x{width}_{variant}"], spacing)
    files["dc_overflow"] = dc_overflow_jpeg()
    files["sos_at_end"] = sos_at_end_jpeg(files["120x160_rst1"])
    # Small files decode fastest: most cases start from one (the large ones make their boxes, seeks and splices
    # long). The driver picks base files uniformly, so the small ones are listed more than once.
    paths = []
    for name, data in files.items():
        path = directory / f"{name}.jpg"
        path.write_bytes(data)
        large = name.startswith(("333x", "500x", "dc_", "sos_"))
        paths += [path] if large else [path, path]
    return paths


def _split(count: int, jobs: int) -> list[tuple[int, int]]:
    """(first case, cases) of each driver process."""
    per, extra = divmod(count, jobs)
    spans, first = [], 0
    for j in range(jobs):
        n = per + (j < extra)
        if n:
            spans.append((first, n))
        first += n
    return spans


def _report(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ERROR:" in line or "runtime error" in line), 0)
    return "\n".join(lines[start:start + 12])


def run(driver: Path, corpus: list[Path], *, count: int, seed: int, jobs: int, workdir: Path,
        plant: str | None = None) -> int:
    """Run `count` cases over `jobs` processes; the count, or FuzzError for the first failing process. With
    `plant` ('overread' or 'overflow'), each process runs that deliberate bug instead (the tests' proof that a
    report fails the run)."""
    env = {**os.environ, **SANITIZER_ENV}
    processes = []
    for j, (first, n) in enumerate(_split(count, jobs)):
        progress = workdir / f"progress{j}"
        command = [str(driver), "--seed", str(seed), "--first", str(first), "--count", str(n), "--progress",
                   str(progress), *(["--plant", plant] if plant else []), *map(str, corpus)]
        processes.append((subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           env=env), progress, command, n))
    done, failure = 0, None
    for process, progress, command, n in processes:
        try:
            output, _ = process.communicate(timeout=CASE_TIMEOUT_S * max(1, n // 1000))
            hung = False
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            hung = True
        counted = output.split()[-1] if output.split() else ""
        if process.returncode == 0 and not hung and counted == str(n):
            done += n
            continue
        if failure is None:
            case = (progress.read_text().strip() if progress.exists() else "") or "?"
            what = "hung" if hung else f"exit code {process.returncode}"
            if case.startswith("base "):  # the unmutated files, decoded before the cases
                failure = f"{case}: {what}\n{_report(output)}"
            else:
                replay = [command[0], "--seed", str(seed), "--first", case, "--count", "1"]
                failure = (f"case {case} (seed {seed}): {what}\n{_report(output)}\nreplay: {shlex.join(replay)} "
                           "BASES... (--dump OUT writes its bytes)")
    if failure:
        raise FuzzError(failure)
    return done


def fuzz(count: int, seed: int = 0, jobs: int = 1, keep: Path | None = None) -> int:
    """Build the driver, make the corpus and run `count` cases; the number run (FuzzError on a report)."""
    with tempfile.TemporaryDirectory(prefix="fuzz_kernel_") as scratch:
        workdir = keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "corpus").mkdir(exist_ok=True)
        driver = build_driver(workdir)
        corpus = make_corpus(workdir / "corpus")
        return run(driver, corpus, count=count, seed=seed, jobs=jobs, workdir=workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="mutated JPEGs to decode (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: case k is a function of (seed, k)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="driver processes (default: CPUs)")
    parser.add_argument("--keep", type=Path, help="build and corpus directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.jobs < 1 or args.seed < 0:
        parser.error("--count and --jobs must be at least 1, --seed at least 0")
    start = time.perf_counter()
    try:
        done = fuzz(args.count, args.seed, args.jobs, args.keep)
    except FuzzError as error:
        print(f"error: sanitizer fuzzing failed at {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"{done} mutated JPEGs decoded under ASan+UBSan in {seconds:.1f} s ({done / seconds:.0f}/s, "
          f"{args.jobs} processes, seed {args.seed}): no sanitizer report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
