"""Check the comparison results against the targets of issue 6 and print Markdown.

    python benchmarks/summarize.py outputs/era5_imputation-quick outputs/bunny_mnist_inpainting-quick \\
        outputs/image_inverse-quick outputs/generalization-quick [--json PATH]

Reads each folder's ``results.json`` (written by the comparison scripts) and prints one table of
targets: the measured value, the target and whether it is met. Nothing is run or tuned here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from geodiff.timing import write_json


def _rows(folders) -> list[dict]:
    rows = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the benchmark script with --out {folder}")
        rows.extend(json.loads(path.read_text())["rows"])
    return rows


def checks(rows: list[dict]) -> list[dict]:
    """One entry per target and task: (target, task, measured, goal, met)."""
    by = {}
    for r in rows:
        by.setdefault(r["task"], {})[r["method"]] = r
    out = []

    def add(target, task, value, goal, met):
        out.append({"target": target, "task": task, "measured": value, "goal": goal, "met": bool(met)})

    for task, m in by.items():
        if "DPS" in m and "APS(1)" in m:
            dps = m["DPS"]["time_per_sample_s"]
            s1 = dps / m["APS(1)"]["time_per_sample_s"]
            s128 = dps / m["APS(128)"]["time_per_sample_s"]
            add("APS(1) speed-up per sample vs DPS", task, f"{s1:,.0f}×", "≥ 5,000×", s1 >= 5000)
            add("APS(128) speed-up per sample vs DPS", task, f"{s128:,.0f}×", "≥ 50,000×", s128 >= 50000)
            n = m["APS(128)"]["break_even_n"]
            add("break-even N*", task, "never" if n is None else f"{n:.1f}", "≤ 500",
                n is not None and n <= 500)
        if "APS(128)" in m:
            aps = m["APS(128)"]["psnr"]
            low = task.lower()
            if "era5" in low and "DPS" in m:
                d = aps - m["DPS"]["psnr"]
                add("APS(128) PSNR − DPS", task, f"{d:+.2f} dB", "≥ +2 dB", d >= 2)
                k = aps - m["Kriging"]["psnr"]
                add("APS(128) PSNR − kriging", task, f"{k:+.2f} dB", "≥ −0.5 dB", k >= -0.5)
            if "bunny" in low and "DPS" in m:
                d = aps - m["DPS"]["psnr"]
                add("APS(128) PSNR − DPS", task, f"{d:+.2f} dB", "≥ −1 dB", d >= -1)
            if "grid denoise" in low and "DPS" in m:
                d = aps - m["Noise2Score"]["psnr"]
                add("APS(128) PSNR − Noise2Score", task, f"{d:+.2f} dB", "≥ +1 dB", d >= 1)
                d = aps - m["DPS"]["psnr"]
                add("APS(128) PSNR − DPS", task, f"{d:+.2f} dB", "≥ −2 dB", d >= -2)
            if "seen: training" not in low:
                c = m["APS(128)"]["coverage90"]
                add("90% coverage (held-out)", task, f"{c:.3f}", "0.85–0.95", 0.85 <= c <= 0.95)
            if low.startswith("blind"):
                add("blind imputation APS(128) PSNR", task, f"{aps:.2f} dB", "> 33 dB (paper)", aps > 33)
    return out


def markdown(entries: list[dict]) -> str:
    lines = ["| target | task | measured | goal | met |", "|---|---|---|---|---|"]
    lines += [f"| {e['target']} | {e['task']} | {e['measured']} | {e['goal']} | "
              f"{'yes' if e['met'] else '**no**'} |" for e in entries]
    return "\n".join(lines)


def shrink_figures(folders, dest: Path, *, width: int = 1100) -> list[Path]:
    """Copy every PNG of ``folders`` to ``dest`` as ``<folder name>-<file>``, at most ``width``
    pixels wide and with a 256-colour palette (the documentation's copies; a few hundred KB)."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for folder in folders:
        for png in sorted(Path(folder).glob("*.png")):
            img = Image.open(png).convert("RGB")
            if img.width > width:
                img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
            name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-"
                           for c in f"{Path(folder).name}-{png.name}")
            out = dest / name
            img.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(out, optimize=True)
            written.append(out)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="output folders of the comparison scripts")
    p.add_argument("--json", default=None)
    p.add_argument("--figures", default=None,
                   help="also copy the folders' figures here, shrunk (e.g. docs/figures)")
    args = p.parse_args(argv)
    entries = checks(_rows(args.folders))
    print(markdown(entries))
    if args.figures:
        for path in shrink_figures(args.folders, Path(args.figures)):
            print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    if args.json:
        write_json(args.json, {"checks": entries, "folders": args.folders})
    return entries


if __name__ == "__main__":
    main()
