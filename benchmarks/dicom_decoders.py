"""pylibjpeg against python-gdcm (and pydicom's own / Pillow's) decoding DICOM pixel data, side by side.

Builds DICOM files in a temporary folder from 8 real FracAtlas radiographs at their full resolution, one
per transfer syntax, and times pydicom.pixels.pixel_array with each decoding plugin (median of 5).
Run: python3 benchmarks/dicom_decoders.py  (needs fracfeat[dicom] and python-gdcm)
"""
import csv, io, statistics, sys, tempfile, time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import pixel_array

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_dicom import _jpeg_lossless, dicom_of, save  # the tests' own DICOM writers
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

FRACATLAS = REPO.parent / "shared" / "data" / "fracatlas"
rows = [r for r in csv.DictReader(open(FRACATLAS / "manifest.csv")) if r["use"] == "1"][:8]
tmp = Path(tempfile.mkdtemp())
files = {"JPEG baseline": [], "JPEG lossless SV1": [], "JPEG 2000 lossless": [], "RLE": []}
for i, r in enumerate(rows):
    a = np.asarray(Image.open(FRACATLAS / r["path"]).convert("L"))
    files["JPEG baseline"].append(save(dicom_of(a), tmp / f"jpeg{i}.dcm", JPEGBaseline8Bit))
    files["JPEG lossless SV1"].append(_jpeg_lossless(save(dicom_of(a), tmp / f"raw{i}.dcm"), tmp / f"ll{i}.dcm"))
    files["JPEG 2000 lossless"].append(save(dicom_of(a), tmp / f"j2k{i}.dcm", JPEG2000Lossless))
    files["RLE"].append(save(dicom_of(a), tmp / f"rle{i}.dcm", RLELossless))
plugins = {"JPEG baseline": ["pylibjpeg", "gdcm", "pillow"], "JPEG lossless SV1": ["pylibjpeg", "gdcm"],
           "JPEG 2000 lossless": ["pylibjpeg", "gdcm", "pillow"], "RLE": ["pylibjpeg", "gdcm", "pydicom"]}
print(f"{len(rows)} FracAtlas radiographs, {rows and Image.open(FRACATLAS / rows[0]['path']).size} px and alike")
for syntax, paths in files.items():
    datasets = [pydicom.dcmread(p) for p in paths]
    ref = [pixel_array(ds, decoding_plugin="pylibjpeg") for ds in datasets]
    line = []
    for plugin in plugins[syntax]:
        try:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                out = [pixel_array(ds, decoding_plugin=plugin) for ds in datasets]
                times.append((time.perf_counter() - t) / len(datasets) * 1000)
            same = all(np.array_equal(a, b) for a, b in zip(out, ref))
            line.append(f"{plugin} {statistics.median(times):.1f} ms{'' if same else ' (pixels differ)'}")
        except Exception as e:
            line.append(f"{plugin}: {type(e).__name__}")
    print(f"{syntax}: " + ", ".join(line))

# fracfeat's whole decode (file -> 224 x 224 x 3 uint8) of the same radiographs: the JPEG file against DICOM.
from fracfeat._images import load_image

cases = {"FracAtlas JPEG (draft mode)": [FRACATLAS / r["path"] for r in rows],
         "DICOM explicit VR LE": [tmp / f"raw{i}.dcm" for i in range(len(rows))],
         "DICOM JPEG baseline": files["JPEG baseline"], "DICOM JPEG 2000 lossless": files["JPEG 2000 lossless"],
         "DICOM RLE": files["RLE"]}
for name, paths in cases.items():
    times = []
    for _ in range(5):
        t = time.perf_counter()
        assert all(load_image(str(p), 224).error is None for p in paths)
        times.append((time.perf_counter() - t) / len(paths) * 1000)
    print(f"load_image at 224 px, {name}: {statistics.median(times):.1f} ms per file")
