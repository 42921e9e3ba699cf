"""Per-image cost of the site-robust pixel settings, and OpenCV's CLAHE against scikit-image's.

1. ``load_image`` at 224 px on 50 real radiographs (25 FracAtlas, 25 HBFMID), one thread, ms/image, median
   of 3 interleaved runs, ratio to the default recipe (crop="none", intensity="none").
2. CLAHE alone (clip 2.0 / 0.01, 8x8 tiles) on the same images' full-size grayscale: OpenCV
   (``cv2.createCLAHE``, what ``intensity="clahe"`` uses) against scikit-image's ``equalize_adapthist``
   (skipped when scikit-image is not installed).

    python benchmarks/site_inputs_cost.py
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fracfeat._hardware import describe_machine  # noqa: E402
from fracfeat._images import PixelRecipe, load_image  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPES = {"default": {}, "crop=content": {"crop": "content"}, "intensity=percentile": {"intensity": "percentile"},
           "intensity=clahe": {"intensity": "clahe"}, "crop=content+clahe": {"crop": "content", "intensity": "clahe"}}


def radiographs() -> list[str]:
    def rows(name):
        with open(DATA / name / "manifest.csv", newline="") as f:
            return [str(DATA / name / r["path"]) for r in csv.DictReader(f) if r.get("use", "1") == "1"]
    return rows("fracatlas")[::150][:25] + rows("hbfmid")[::23][:25]


def median_ms(fn, n: int, runs: int = 3) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) / n * 1000)
    return statistics.median(times), times


def main() -> int:
    import cv2
    from PIL import Image

    print(describe_machine())
    paths = radiographs()
    recipes = {name: PixelRecipe(224, **kw) for name, kw in RECIPES.items()}
    for r in recipes.values():
        [load_image(p, r) for p in paths]  # warm: imports, file cache
    times = {name: [] for name in recipes}
    for _ in range(3):  # interleaved, so the machine's noise hits every setting alike
        for name, r in recipes.items():
            times[name].append(median_ms(lambda: [load_image(p, r) for p in paths], len(paths), runs=1)[0])
    base = statistics.median(times["default"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:22s} {m:6.2f} ms/image  x{m / base:.2f}  (runs {', '.join(f'{t:.2f}' for t in ts)})")
    grays = [np.asarray(Image.open(p).convert("L")) for p in paths]
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    ocv, _ = median_ms(lambda: [clahe.apply(g) for g in grays], len(grays))
    print(f"CLAHE full size: opencv {ocv:.2f} ms/image")
    try:
        from skimage import exposure
    except ImportError:
        print("scikit-image not installed: its CLAHE not measured")
        return 0
    sk, _ = median_ms(lambda: [exposure.equalize_adapthist(g, clip_limit=0.01) for g in grays], len(grays))
    print(f"CLAHE full size: scikit-image {sk:.2f} ms/image, {sk / ocv:.1f}x OpenCV's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
