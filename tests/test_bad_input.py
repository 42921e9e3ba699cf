"""Damaged and unusual image files: correct pixels, or a failure row while every other image is extracted.

The corpus is generated in tmp_path (plus a few of FracAtlas' real truncated JPEGs).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from children import as_user
from conftest import TINY, manifest_rows
from fracfeat import ImageError, extract
from fracfeat._images import decode_bytes, failure_kind, load_image, read_file

SIZE = 32

# Pillow warns about every file over its pixel limit before fracfeat refuses it; expected here.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def radiograph_like(w=96, h=80, seed=0) -> np.ndarray:
    """A smooth grayscale test pattern (uint8), so resizing differences stay tiny."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 7.0) + rng.normal(0, 3, (h, w))
    return np.clip(base, 0, 255).astype(np.uint8)


def block_pattern(w=128, h=96, seed=1) -> np.ndarray:
    """Gray levels constant on each 8x8 block: JPEG (4:4:4, quality 100) stores these exactly,
    in any orientation, so an EXIF-rotated copy decodes to exactly the upright pixels."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 8, w // 8), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (no real pixel data): enough to trip the bomb guard."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def real_truncated(n=3) -> list[Path]:
    from conftest import FRACATLAS

    return [FRACATLAS / r["path"] for r in manifest_rows() if r["issue"] == "truncated_jpeg"][:n]


@pytest.fixture()
def corpus(tmp_path, fracatlas) -> dict[str, Path]:
    """name -> path of every bad or unusual file (see each comment for what it must give)."""
    d = tmp_path / "corpus"
    d.mkdir()
    files: dict[str, Path] = {}
    gray = radiograph_like()

    def put(name, filename):
        files[name] = d / filename
        return files[name]

    # Good files: each must give correct pixels.
    Image.fromarray(gray, "L").save(put("gray8_png", "gray8.png"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(put("gray16_png", "gray16.png"))  # same image, 16-bit
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 7)])  # nearly transparent: alpha must be dropped
    Image.fromarray(rgba, "RGBA").save(put("rgba_png", "rgba.png"))
    Image.fromarray(gray, "L").convert("P").save(put("palette_png", "palette.png"))
    rgb = np.dstack([gray, np.roll(gray, 5, axis=1), 255 - gray])
    Image.fromarray(rgb, "RGB").save(put("rgb_png", "rgb.png"))
    Image.fromarray(rgb, "RGB").convert("CMYK").save(put("cmyk_jpeg", "cmyk.jpg"), quality=100, subsampling=0)
    Image.fromarray(np.array([[200]], np.uint8), "L").save(put("one_pixel", "one_pixel.png"))
    upright = block_pattern()
    Image.fromarray(upright, "L").save(put("upright_jpeg", "upright.jpg"), quality=100, subsampling=0)
    # Stored rotated 90 degrees clockwise; EXIF orientation 8 tells viewers to rotate it back.
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.rot90(upright, k=-1).copy(), "L").save(put("exif_rotated", "exif_rotated.jpg"),
                                                               quality=100, subsampling=0, exif=exif)
    shutil.copy(files["gray8_png"], put("non_ascii", "Röntgen_骨折 ü.png"))
    # Bad files: each must become a failure row.
    put("zero_bytes", "empty.jpg").write_bytes(b"")
    put("random_bytes", "random.jpg").write_bytes(np.random.default_rng(3).bytes(5000))
    put("text_png", "notes.png").write_text("this is a text file, not a PNG\n")
    png_header_only(put("bomb", "bomb.png"), 20000, 20000)  # 400 Mpx, beyond 2x Pillow's limit
    png_header_only(put("bomb_warning", "big.png"), 10000, 10000)  # between 1x and 2x: a warning in Pillow
    good_jpeg = io.BytesIO()
    Image.fromarray(radiograph_like(400, 300), "L").save(good_jpeg, format="JPEG", quality=90)
    put("cut_jpeg", "cut.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) * 2 // 3])
    os.symlink(d / "does-not-exist.jpg", put("broken_symlink", "dangling.jpg"))
    put("directory", "folder.jpg").mkdir()
    os.mkfifo(put("fifo", "pipe.jpg"))  # opening a FIFO for reading blocks until a writer comes
    for k, p in enumerate(real_truncated(3)):
        shutil.copy(p, put(f"real_truncated_{k}", f"real_truncated_{k}.jpg"))
    return files


GOOD = ("gray8_png", "gray16_png", "rgba_png", "palette_png", "rgb_png", "cmyk_jpeg", "one_pixel", "upright_jpeg",
        "exif_rotated", "non_ascii", "real_truncated_0", "real_truncated_1", "real_truncated_2")
BAD = {  # name -> failure kind
    "zero_bytes": "empty file", "random_bytes": "not an image", "text_png": "not an image",
    "bomb": "too large", "bomb_warning": "too large", "cut_jpeg": "truncated image",
    "broken_symlink": "file not found", "directory": "not a regular file", "fifo": "not a regular file",
}


def test_corpus_decodes_to_correct_pixels_or_a_reason(corpus):
    got = {name: load_image(str(p), SIZE, truncated="read") for name, p in corpus.items() if name != "cut_jpeg"}
    for name in GOOD:
        assert got[name].error is None, (name, got[name].error)
        assert got[name].pixels.shape == (SIZE, SIZE, 3) and got[name].pixels.dtype == np.uint8
    ref = got["gray8_png"].pixels
    # 16-bit samples are scaled by the range of the type: the 16-bit copy of an 8-bit image is the same image.
    np.testing.assert_array_equal(got["gray16_png"].pixels, ref)
    np.testing.assert_array_equal(got["rgba_png"].pixels, ref)  # alpha dropped, not composited
    np.testing.assert_array_equal(got["palette_png"].pixels, ref)
    np.testing.assert_array_equal(got["non_ascii"].pixels, ref)
    # CMYK is converted back to (nearly) the RGB it was made from, not inverted.
    diff = np.abs(got["cmyk_jpeg"].pixels.astype(int) - got["rgb_png"].pixels.astype(int))
    assert diff.mean() < 4, diff.mean()
    assert (got["one_pixel"].pixels == 200).all()
    np.testing.assert_array_equal(got["exif_rotated"].pixels, got["upright_jpeg"].pixels)
    for k in range(3):
        assert got[f"real_truncated_{k}"].truncated
    for name, kind in BAD.items():
        d = load_image(str(corpus[name]), SIZE, truncated="reject" if name == "cut_jpeg" else "read")
        assert d.pixels is None and d.error, name
        assert failure_kind(d.error) == kind, (name, d.error)


def test_truncated_policy_read_flags_reject_fails(corpus):
    data = corpus["real_truncated_0"].read_bytes()
    read = decode_bytes(data, SIZE, truncated="read")
    assert read.error is None and read.truncated
    rejected = decode_bytes(data, SIZE, truncated="reject")
    assert rejected.pixels is None and "truncated" in rejected.error and "truncated='read'" in rejected.error


@pytest.mark.slow
def test_non_utf8_file_name_is_extracted(tmp_path, corpus):
    """Linux file names are bytes; one that is not UTF-8 must not crash writing the HDF5 string columns."""
    d = os.fsencode(tmp_path / "raw")
    os.mkdir(d)
    name = os.path.join(d, b"scan-\xff\xfe.png")
    shutil.copy(corpus["gray8_png"], name)
    fs = extract(os.fsdecode(d), store=tmp_path / "store", **TINY)
    assert len(fs) == 1 and not fs.failures
    assert "scan-" in fs.paths[0]


def read_as_nobody(path: Path) -> str:
    """read_file(path)'s failure reason, in a forked child that has dropped root for the 'nobody' user."""
    return as_user("nobody", lambda: read_file(str(path))[1])


def test_unreadable_file_reports_permission_denied(tmp_path):
    """root reads any file whatever its mode, so as root the read happens in a forked child that has
    dropped to the 'nobody' user: a real permission failure, not a mock."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fracfeat-perm-"))  # in /tmp, reachable by nobody (tmp_path is not)
    try:
        folder.chmod(0o755)
        secret = folder / "secret.png"
        Image.fromarray(radiograph_like(), "L").save(secret)
        secret.chmod(0o000)
        reason = read_as_nobody(secret) if os.geteuid() == 0 else read_file(str(secret))[1]
        assert failure_kind(reason) == "permission denied", reason
        assert load_image(str(secret), SIZE).pixels is not None or os.geteuid() != 0  # root itself still reads it
    finally:
        shutil.rmtree(folder)


@pytest.mark.slow
def test_extract_keeps_every_good_image_and_records_each_bad_one(corpus, tmp_path, caplog):
    paths = [str(corpus[name]) for name in list(GOOD) + list(BAD)]
    with caplog.at_level("WARNING", logger="fracfeat"):
        fs = extract(paths, store=tmp_path / "store", truncated="read", **TINY)
    kept = list(GOOD) + ["cut_jpeg"]  # truncated="read" reads a cut JPEG as far as it goes
    assert len(fs) == len(kept)
    assert sorted(fs.paths) == sorted(os.path.abspath(corpus[n]) for n in kept)
    by_path = {f["path"]: f["reason"] for f in fs.failures}
    for name, kind in BAD.items():
        if name == "cut_jpeg":
            continue
        assert failure_kind(by_path[str(corpus[name])]) == kind
    assert str(corpus["cut_jpeg"]) not in by_path
    truncated = {p for p, t in zip(fs.paths, fs.truncated) if t}
    assert truncated == {os.path.abspath(corpus[n]) for n in ("real_truncated_0", "real_truncated_1", "real_truncated_2", "cut_jpeg")}
    # The summary: counts per kind, in the API and in the log.
    summary = fs.failure_summary()
    assert summary == {"not a regular file": 2, "not an image": 2, "too large": 2, "empty file": 1,
                       "file not found": 1}
    assert "8 of 22 images could not be used" in caplog.text and "2 x not a regular file" in caplog.text
    # The version on disk holds the same failure rows, and reopening it gives the same summary.
    from fracfeat import FeatureStore

    again = FeatureStore(tmp_path / "store").open("latest")
    assert again.failure_summary() == summary
    # Features of a rotated file equal those of the upright one; the 16-bit copy equals the 8-bit one.
    row = {p: x for p, x in zip(fs.paths, fs.X)}
    np.testing.assert_array_equal(row[os.path.abspath(corpus["exif_rotated"])], row[os.path.abspath(corpus["upright_jpeg"])])
    np.testing.assert_array_equal(row[os.path.abspath(corpus["gray16_png"])], row[os.path.abspath(corpus["gray8_png"])])

    rejected = extract(paths, store=tmp_path / "store", truncated="reject", **TINY)
    assert len(rejected) == len(GOOD) - 3
    assert rejected.failure_summary()["truncated image"] == 4


def test_strict_names_the_first_bad_file(corpus, tmp_path):
    paths = [str(corpus["gray8_png"]), str(corpus["text_png"]), str(corpus["zero_bytes"])]
    with pytest.raises(ImageError, match=r"notes\.png.*strict mode.*API strict=False, CLI without --strict"):
        extract(paths, store=tmp_path / "store", strict=True, **TINY)
    with pytest.raises(ImageError, match=r"dangling\.jpg.*file not found"):
        extract([str(corpus["broken_symlink"])], store=tmp_path / "store", strict=True, **TINY)


def test_truncated_policy_holds_when_decoding_in_threads(fracatlas):
    """Pillow reads truncated files only through a module-wide flag. While one thread reads a truncated
    file with the flag on, another thread's truncated file must still be flagged (or rejected)."""
    from concurrent.futures import ThreadPoolExecutor

    blobs = [p.read_bytes() for p in real_truncated(4)]
    jobs = [(blobs[k % 4], "read" if k % 2 else "reject") for k in range(64)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: decode_bytes(job[0], SIZE, truncated=job[1]), jobs))
    for (_, policy), r in zip(jobs, results):
        if policy == "read":
            assert r.error is None and r.truncated
        else:
            assert r.pixels is None and failure_kind(r.error) == "truncated image"


def test_decompression_bomb_guard_holds_when_decoding_in_threads(tmp_path):
    """warnings.catch_warnings is process-wide, not per thread: the guard must not depend on it."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    png_header_only(tmp_path / "big.png", 10000, 10000)  # over MAX_IMAGE_PIXELS, under 2x: only a warning in Pillow
    Image.fromarray(radiograph_like(), "L").save(tmp_path / "ok.png")
    big, ok = (tmp_path / "big.png").read_bytes(), (tmp_path / "ok.png").read_bytes()
    filters_before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: decode_bytes(big if k % 2 else ok, SIZE), range(200)))
    for k, r in enumerate(results):
        if k % 2:
            assert r.pixels is None and failure_kind(r.error) == "too large", r.error
        else:
            assert r.error is None
    assert warnings.filters == filters_before  # decoding leaves the process's warning filters as they were


@pytest.mark.slow
def test_cli_truncated_and_strict_options(corpus, tmp_path, python, subprocess_env):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("gray8_png", "real_truncated_0", "text_png"):
        shutil.copy(corpus[name], folder / corpus[name].name)
    os.symlink(tmp_path / "gone.png", folder / "gone.png")
    store = tmp_path / "cli-store"
    base = [python, "-m", "fracfeat", "extract", str(folder), "--store", str(store), "--weights", "none",
            "--image-size", "32", "-q"]
    import subprocess

    r = subprocess.run(base + ["--strict"], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "gone.png: file not found" in r.stderr and "without --strict" in r.stderr, r.stderr
    r = subprocess.run(base + ["--truncated", "reject"], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "failed: 1 file not found, 1 not an image, 1 truncated image" in r.stdout, r.stdout
    assert "real_truncated_0.jpg: truncated image:" in r.stdout
