"""What decoding a user's image costs, as preprocess decodes it (JPEG in PIL's draft mode,
`dynemb.stages.preprocess.features.decode_image_sized`) against decoding every pixel first
(what it did before), on SYNTHETIC photo-like images (smooth colour fields with grain) in
JPEG, PNG and WEBP at four sizes. Both variants alternate in one run (the median of
several rounds each), and the 32x32 results are compared level by level.

    .venv/bin/python benchmarks/image_decode.py --rounds 5
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dynemb.bench.context import collect_context, context_markdown, write_results
from dynemb.stages.preprocess.features import decode_image_sized

RESULTS = Path(__file__).parent / "results"
SIZES = ((256, 192), (800, 600), (2000, 1500), (4000, 3000))
FORMATS = ("JPEG", "PNG", "WEBP")
DATA = "SYNTHETIC photo-like images (seeded), JPEG quality 90, PNG and WEBP defaults"


@dataclass
class Row:
    format: str
    size: str
    kilobytes: int
    full_ms: float  # every pixel decoded, then resized (before)
    served_ms: float  # decode_image_sized
    mean_levels: float  # mean |difference| of the 32x32 results, in levels of 255
    max_levels: int


@dataclass
class DecodeResult:
    rounds: int
    rows: list[Row] = field(default_factory=list)


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.integers(-10, 11, (height, width, 3))
    return Image.fromarray(np.clip(smooth.astype(np.int16) + grain, 0, 255).astype(np.uint8))


def full_decode(data: bytes, size: int = 32) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def served_decode(data: bytes, size: int = 32) -> np.ndarray:
    return decode_image_sized("EVENT_IMAGE[0]", data, size)[0]


def timed_ms(decode, data: bytes, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        decode(data)
    return 1e3 * (time.perf_counter() - started) / repeats


def measure(rounds: int) -> DecodeResult:
    rng = np.random.default_rng(20_261_207)
    result = DecodeResult(rounds)
    for width, height in SIZES:
        image = photo(width, height, rng)
        for fmt in FORMATS:
            out = io.BytesIO()
            image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            data = out.getvalue()
            repeats = max(2, int(4e6 / (width * height)))
            full, served = [], []
            for r in range(rounds):  # alternating, so that drift hits both alike
                for variant in ((full_decode, full), (served_decode, served))[:: 1 - 2 * (r % 2)]:
                    variant[1].append(timed_ms(variant[0], data, repeats))
            gap = np.abs(full_decode(data).astype(np.int16) - served_decode(data))
            result.rows.append(
                Row(fmt, f"{width}x{height}", len(data) // 1024, statistics.median(full),
                    statistics.median(served), float(gap.mean()), int(gap.max()))
            )  # fmt: skip
            print(f"{fmt} {width}x{height}: {result.rows[-1]}", flush=True)
    return result


def markdown(result: DecodeResult, context) -> str:
    lines = [
        "# Decoding a user's image: draft-mode JPEG against every pixel",
        "",
        f"{DATA}. Median of {result.rounds} alternating rounds per variant, one thread; "
        "`served` is preprocess's `decode_image_sized` (JPEG at the smallest DCT scale that "
        "covers 32x32), `full` decodes every pixel and then resizes, as before. The last two "
        "columns compare their 32x32 results.",
        "",
        "| format | size | kB | full ms | served ms | full / served | mean levels | max levels |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.format} | {row.size} | {row.kilobytes} | {row.full_ms:.2f} | "
            f"{row.served_ms:.2f} | {row.full_ms / row.served_ms:.2f} | "
            f"{row.mean_levels:.2f} | {row.max_levels} |"
        )
    return "\n".join([*lines, "", context_markdown(context)]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="image-decode")
    args = parser.parse_args()
    context = collect_context(data=DATA)
    if context.load_warning():
        print(f"warning: {context.load_warning()}", file=sys.stderr)
    result = measure(args.rounds)
    context.finish()
    text = markdown(result, context)
    write_results(RESULTS / args.out, result, context, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
