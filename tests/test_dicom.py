"""DICOM in: real FracAtlas radiographs written as DICOM by pydicom here, and pydicom's bundled test files.

The files are built once per session (``dicom_files``) from 4 real radiographs, downscaled to 320 px
so that decoding stays fast. What each case checks is in its name.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed: pip install 'fracfeat[dicom]'")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, generate_uid,
)

from conftest import manifest_rows  # noqa: E402
from fracfeat import ExtractorSettings  # noqa: E402
from fracfeat._dicom import DICOMDIR_NAME, INSTALL, patient_group, salt_file, viewer_pixels  # noqa: E402
from fracfeat._images import decode_bytes, load_image  # noqa: E402
from fracfeat._sources import DICOM_REASON, load_records  # noqa: E402

SECRET_PATIENT = "PAT-7731-SECRET"
SIDE = 320  # the real radiographs are resized to 288 x 320 px, for fast decoding


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    monkeypatch.setenv("FRACFEAT_ID_SALT", "test-salt")


def _gray_images(fracatlas, n=4) -> list[np.ndarray]:
    from PIL import Image

    rows = [r for r in manifest_rows() if r["use"] == "1"][:n]
    out = []
    for r in rows:
        with Image.open(fracatlas / r["path"]) as img:
            gray = img.convert("L")
            gray = gray.resize((SIDE - 32, SIDE), Image.Resampling.BILINEAR)
            out.append(np.asarray(gray))
    return out


def dicom_of(stored: np.ndarray, *, bits: int = 8, photometric: str = "MONOCHROME2", patient: str = "P1",
             site: str = "", manufacturer: str = "", body_part: str = "", **elements) -> Dataset:
    """A DX dataset holding ``stored`` (uint8/uint16, (rows, cols) or (frames, rows, cols)), explicit VR LE."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "DX", patient, f"Doe^{patient}"
    for name, value in (("InstitutionName", site), ("Manufacturer", manufacturer), ("BodyPartExamined", body_part)):
        if value:
            setattr(ds, name, value)
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    ds.PixelData = stored.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    return ds


def save(ds: Dataset, path: Path, syntax=None) -> Path:
    """``ds`` written to ``path`` in ``syntax`` (default: as it is)."""
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax == JPEGBaseline8Bit:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns)).save(buf, "JPEG", quality=95)
        ds.PixelData, ds.file_meta.TransferSyntaxUID = encapsulate([buf.getvalue()]), syntax
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    elif syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_lossless(src: Path, dst: Path) -> Path | None:
    """``src`` re-encoded as JPEG Lossless SV1 with GDCM (pydicom cannot encode it), or None without GDCM."""
    try:
        import gdcm
    except ImportError:
        return None
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def _voi_lut_12_to_8() -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = np.rint(np.arange(4096) * 255 / 4095).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    return Sequence([item])


@pytest.fixture(scope="session")
def dicom_files(tmp_path_factory, fracatlas) -> dict:
    """name -> path of each DICOM case, and "pixels": the 8-bit source pixels of image 0."""
    root = tmp_path_factory.mktemp("dicom")
    images = _gray_images(fracatlas)
    a = images[0]
    a12 = np.rint(a.astype(np.float64) * 4095 / 255).astype(np.uint16)
    f = {"pixels": a, "images": images}
    f["mono2"] = save(dicom_of(a, patient=SECRET_PATIENT), root / "mono2.dcm")
    f["mono1"] = save(dicom_of(255 - a, photometric="MONOCHROME1", ViewPosition="PA"), root / "mono1.dcm")
    f["bits12"] = save(dicom_of(a12, bits=12), root / "bits12.dcm")
    f["window_full"] = save(dicom_of(a12, bits=12, WindowCenter=2048, WindowWidth=4096,
                                     VOILUTFunction="LINEAR_EXACT"), root / "window_full.dcm")
    f["windows_two"] = save(dicom_of(a12, bits=12, WindowCenter=[1000, 2048], WindowWidth=[400, 4096],
                                     VOILUTFunction="LINEAR_EXACT"), root / "windows_two.dcm")
    f["voi_lut"] = save(dicom_of(a12, bits=12, VOILUTSequence=_voi_lut_12_to_8()), root / "voi_lut.dcm")
    # Rescale: the window is in modality units (HU-like), so it is right only if applied after the rescale.
    f["rescaled"] = save(dicom_of(a12, bits=12, RescaleSlope=0.5, RescaleIntercept=-100, RescaleType="US",
                                  WindowCenter=0.5 * 2048 - 100, WindowWidth=0.5 * 4096,
                                  VOILUTFunction="LINEAR_EXACT", ViewPosition="LL"), root / "rescaled.dcm")
    f["implicit"] = save(dicom_of(a), root / "implicit.dcm", ImplicitVRLittleEndian)
    f["rle"] = save(dicom_of(a), root / "rle.dcm", RLELossless)
    f["j2k"] = save(dicom_of(a12, bits=12), root / "j2k.dcm", JPEG2000Lossless)
    f["jpeg"] = save(dicom_of(a), root / "jpeg.dcm", JPEGBaseline8Bit)
    f["jpeg_ll"] = _jpeg_lossless(f["mono2"], root / "jpeg_ll.dcm")
    f["frames"] = save(dicom_of(np.stack([images[1], a, images[2]])), root / "frames.dcm")
    ds = dicom_of(a)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a text report
    f["no_pixels"] = save(ds, root / "no_pixels.dcm")
    data = f["mono2"].read_bytes()
    for name, cut in (("damaged", data[:400]), ("cut_pixels", data[:-1000]), ("garbage", data[:132] + bytes(range(256)))):
        f[name] = root / f"{name}.dcm"
        f[name].write_bytes(cut)
    ds = dicom_of(a)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder reads it
    ds.PixelData = encapsulate([ds.PixelData])
    f["mpeg2"] = save(ds, root / "mpeg2.dcm")
    return f


def _read(path, **settings) -> np.ndarray:
    return viewer_pixels(Path(path).read_bytes(), **settings)


def _close(a, b, tol=1):
    assert a.shape == b.shape
    assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= tol


# -- pixels ------------------------------------------------------------------------------------------------

def test_monochrome1_is_inverted_to_its_monochrome2_twin(dicom_files):
    np.testing.assert_array_equal(_read(dicom_files["mono1"]), dicom_files["pixels"])
    np.testing.assert_array_equal(_read(dicom_files["mono1"], invert="never"), 255 - dicom_files["pixels"])


def test_12_bit_data_is_scaled_by_bits_stored_not_by_its_values(dicom_files):
    _close(_read(dicom_files["bits12"]), dicom_files["pixels"])
    # the radiograph does not span 0..4095: scaling by its own min..max would stretch it
    assert _read(dicom_files["bits12"]).max() == dicom_files["pixels"].max()


def test_window_voi_lut_and_rescale_apply_in_the_viewer_order(dicom_files):
    a = dicom_files["pixels"]
    _close(_read(dicom_files["window_full"]), a)
    _close(_read(dicom_files["voi_lut"]), a)
    _close(_read(dicom_files["voi_lut"], window="none"), a)
    _close(_read(dicom_files["rescaled"]), a)


def test_several_windows_first_or_widest_or_none(dicom_files):
    a, path = dicom_files["pixels"], dicom_files["windows_two"]
    _close(_read(path, window="widest"), a)
    _close(_read(path, window="none"), a)
    narrow = _read(path)  # the first: center 1000, width 400
    assert (narrow == 255).mean() > 0.1 and (narrow == 0).mean() > 0.1  # a narrow window saturates both ends


@pytest.mark.parametrize("case", ["implicit", "rle", "j2k", "jpeg_ll"])
def test_lossless_transfer_syntaxes_give_the_stored_pixels(dicom_files, case):
    if dicom_files[case] is None:
        pytest.skip("python-gdcm is needed here to encode JPEG Lossless")
    assert pydicom.dcmread(dicom_files[case]).file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
    _close(_read(dicom_files[case]), dicom_files["pixels"], tol=0 if case != "j2k" else 1)


def test_jpeg_baseline_is_decoded_as_fracfeat_decodes_the_same_jpeg_file(dicom_files):
    from PIL import Image
    from pydicom.encaps import generate_frames

    stream = next(generate_frames(pydicom.dcmread(dicom_files["jpeg"]).PixelData, number_of_frames=1))
    np.testing.assert_array_equal(_read(dicom_files["jpeg"]), np.asarray(Image.open(io.BytesIO(stream))))
    assert np.abs(_read(dicom_files["jpeg"]).astype(int) - dicom_files["pixels"].astype(int)).mean() < 2.0


def test_multi_frame_first_or_middle_frame(dicom_files):
    images = dicom_files["images"]
    np.testing.assert_array_equal(_read(dicom_files["frames"]), images[1])
    np.testing.assert_array_equal(_read(dicom_files["frames"], frame="middle"), images[0])


def test_ybr_and_rgb_files_become_rgb():
    from pydicom.data import get_testdata_file

    rle_rgb = viewer_pixels(Path(get_testdata_file("SC_rgb_rle.dcm")).read_bytes())
    jpeg_ybr = viewer_pixels(Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).read_bytes())  # YBR_FULL_422 JPEG
    assert rle_rgb.shape == jpeg_ybr.shape == (100, 100, 3)
    assert np.abs(rle_rgb.astype(int) - jpeg_ybr.astype(int)).mean() < 8  # the same colour bars, lossy


def test_pydicom_bundled_ct_with_rescale_and_big_endian_read():
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"):
        out = load_image(get_testdata_file(name), 32)
        assert out.error is None and out.pixels.shape == (32, 32, 3), name


def test_unreadable_dicom_files_are_failure_rows_naming_the_fix(dicom_files):
    from pydicom.data import get_testdata_file

    cases = ("damaged", "cut_pixels", "garbage", "no_pixels", "mpeg2")
    reasons = {case: load_image(str(dicom_files[case]), 32).error for case in cases}
    assert reasons["damaged"].startswith("damaged DICOM: a Digital X-Ray Image Storage")
    assert reasons["garbage"].startswith("damaged DICOM:")
    assert reasons["cut_pixels"].startswith("cannot decode: DICOM pixel data")
    assert reasons["no_pixels"].startswith("no pixel data:")
    assert reasons["mpeg2"].startswith("unsupported transfer syntax: MPEG2")
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    jpeg_ls = load_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), 32)
    if get_decoder(JPEGLSLossless).is_available:  # GDCM or pyjpegls here: it reads
        assert jpeg_ls.error is None
    else:  # the dicom extra brings no JPEG-LS decoder: the row names the syntax and the install
        assert jpeg_ls.error.startswith("unsupported transfer syntax: JPEG-LS Lossless") and INSTALL in jpeg_ls.error


_WITHOUT = """
import sys
for name in sys.argv[2].split(","):
    sys.modules[name] = None  # this child has no such package
from fracfeat._images import load_image
from fracfeat._sources import load_records
print(load_records(sys.argv[1])[0][0].failure or "-")
print(load_image(sys.argv[1], 32).error)
"""


def _without(packages: str, path: Path, subprocess_env) -> list[str]:
    """The record failure and decode failure of ``path`` in a child process where ``packages`` cannot be imported."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT, str(path), packages], capture_output=True, text=True,
                          env=subprocess_env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_without_the_decoders_a_lossy_syntax_names_its_decoder_and_the_install(dicom_files, tmp_path, subprocess_env):
    ds = pydicom.dcmread(dicom_files["j2k"])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.91"  # JPEG 2000 (lossy allowed): pylibjpeg only
    ds.save_as(tmp_path / "j2k_lossy.dcm")
    record, decoded = _without("pylibjpeg,openjpeg,libjpeg,rle,gdcm", tmp_path / "j2k_lossy.dcm", subprocess_env)
    assert record == "-"
    assert decoded == ("unsupported transfer syntax: JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91) is read "
                       f"with pylibjpeg only (lossy: each decoder gives other pixels); {INSTALL}")


def test_without_pydicom_dicom_files_are_failure_rows_naming_the_extra(dicom_files, subprocess_env):
    record, decoded = _without("pydicom", dicom_files["mono2"], subprocess_env)
    assert record == DICOM_REASON and INSTALL in record
    assert decoded.startswith("missing dependency: pydicom is needed for DICOM files") and INSTALL in decoded


def test_recipe_crop_and_intensity_apply_to_dicom_as_to_png(dicom_files, tmp_path):
    from PIL import Image

    png = tmp_path / "same.png"
    Image.fromarray(dicom_files["pixels"]).save(png)
    for recipe in ({"crop": "content"}, {"intensity": "percentile"}):
        from fracfeat._images import PixelRecipe

        r = PixelRecipe(48, **recipe)
        np.testing.assert_array_equal(decode_bytes(dicom_files["mono1"].read_bytes(), r).pixels,
                                      decode_bytes(png.read_bytes(), r).pixels)


# -- records -----------------------------------------------------------------------------------------------

def _site_folder(root: Path, images, n_patients=4, per_patient=4, extensionless=True) -> Path:
    """root/{fractured,not_fractured}/: each patient's images in one class, two sites, MONOCHROME1 and 2."""
    k = 0
    for p in range(n_patients):
        label = "fractured" if p % 2 == 0 else "not_fractured"
        site = "North Hospital" if p < n_patients // 2 else ""
        for j in range(per_patient):
            a = images[k % len(images)]
            a = a if label == "fractured" else a[:, ::-1]
            mono1 = j % 2 == 1
            ds = dicom_of(255 - a if mono1 else a, photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
                          patient=f"{SECRET_PATIENT}-{p}", site=site, manufacturer="Acme DR", body_part="HAND")
            ds.InstanceNumber = k  # every file differs in its bytes
            name = f"IM{k:06d}" if extensionless and j == 0 else f"img{k:03d}.dcm"
            save(ds, root / label / name)
            k += 1
    return root


def test_folder_of_dicom_records_get_hashed_patient_site_and_region(dicom_files, tmp_path):
    root = _site_folder(tmp_path / "ds", dicom_files["images"])
    (root / "fractured" / DICOMDIR_NAME).write_bytes(b"\0" * 128 + b"DICM")  # an index, not an image: skipped
    records, _ = load_records(root)
    assert len(records) == 16 and not any(r.failure for r in records)
    assert any(Path(r.path).suffix == "" for r in records)  # extensionless files, found by their preamble
    assert {r.source for r in records} == {"North Hospital", "Acme DR"}  # InstitutionName, else Manufacturer
    assert {r.region for r in records} == {"hand"}
    groups = {r.group for r in records}
    assert len(groups) == 4 and all(g.startswith("pt-") and SECRET_PATIENT not in g for g in groups)


def test_group_is_a_salted_hash_of_patient_id(monkeypatch, tmp_path):
    first = patient_group("12345")
    monkeypatch.setenv("FRACFEAT_ID_SALT", "another secret")
    assert patient_group("12345") != first and patient_group("12345") == patient_group("12345")
    assert patient_group("", "1.2.3").startswith("st-") and patient_group("", "") == ""
    monkeypatch.delenv("FRACFEAT_ID_SALT")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    made = patient_group("12345")  # the default: a random salt kept in this user's config folder
    assert salt_file() == tmp_path / "fracfeat" / "id_salt" and oct(salt_file().stat().st_mode & 0o777) == "0o600"
    assert len(salt_file().read_text()) == 64 and patient_group("12345") == made != first


def test_csv_manifest_of_dicom_files_keeps_its_columns_over_the_header(dicom_files, tmp_path):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "projection"])
        w.writerow([dicom_files["mono2"], "fractured", "case-1", ""])
        w.writerow([dicom_files["mono1"], "not_fractured", "", "lateral"])
        w.writerow([dicom_files["rescaled"], "not_fractured", "", ""])
    records, _ = load_records(manifest)
    assert [r.group for r in records] == ["case-1", patient_group("P1"), patient_group("P1")]
    assert [r.label for r in records] == [1, 0, 0]
    assert [r.projection for r in records] == ["", "lateral", "LL"]  # the column, else ViewPosition


def test_dicomdir_source_lists_its_images():
    from pydicom.data import get_testdata_file

    dicomdir = Path(get_testdata_file("DICOMDIR"))
    records, description = load_records(dicomdir)
    assert description.startswith("dicomdir:") and len(records) > 10
    assert all(Path(r.path).is_file() and Path(r.path).name != DICOMDIR_NAME for r in records)
    folder_records, _ = load_records(dicomdir.parent)  # its folder: the DICOMDIR, not class folders
    assert sorted(r.path for r in folder_records) == sorted(r.path for r in records)


# -- settings ----------------------------------------------------------------------------------------------

def test_dicom_settings_leave_other_fingerprints_unchanged():
    from fracfeat._config import ExtractorConfig

    base, _ = ExtractorSettings(image_size=64).resolve(None)
    assert not any(k.startswith("dicom") for k in base.as_dict())
    from fracfeat import FeatureStore

    provenance = FeatureStore(Path(__file__).parent / "data" / "stores" / "fracfeat-0.3.0").open().provenance
    assert ExtractorConfig.from_provenance(provenance).fingerprint == provenance["fingerprint"]  # raises otherwise
    assert ExtractorConfig.from_provenance(provenance).dicom_window == "first"
    other, _ = ExtractorSettings(image_size=64, dicom_window="none").resolve(None)
    assert other.fingerprint != base.fingerprint and other.as_dict()["dicom_window"] == "none"
    assert other.settings().dicom_window == "none"


# -- features and the store --------------------------------------------------------------------------------

def _cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_features_of_twins_agree_and_the_store_holds_no_patient_id(dicom_files, vgg16_weights, tmp_path):
    from fracfeat import FeatureStore, extract

    cases = ["mono2", "mono1", "bits12", "rescaled", "jpeg"]
    store = tmp_path / "store"
    fs = extract([dicom_files[c] for c in cases], labels=[1, 1, 1, 0, 0], store=store, backbone="vgg16",
                 weights=str(vgg16_weights), image_size=64, progress=False)
    assert not fs.failures
    X = dict(zip(cases, fs.X))
    for case in ("mono1", "bits12", "rescaled"):
        assert _cosine(X["mono2"], X[case]) >= 0.999, case
    assert fs.groups[0] == patient_group(SECRET_PATIENT)
    assert list(fs.projections) == ["", "PA", "", "LL", ""]  # ViewPosition, where the header has one
    assert list(FeatureStore(store).open().projections) == list(fs.projections)
    for f in store.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert SECRET_PATIENT.encode() not in data and b"Doe^" not in data, f


# -- the main job, end to end ------------------------------------------------------------------------------

def test_fracfeat_run_on_a_dicom_folder_groups_by_patient_and_reports_per_site(dicom_files, tmp_path,
                                                                               subprocess_env):
    root = _site_folder(tmp_path / "ds", dicom_files["images"], n_patients=8, per_patient=2)
    out = tmp_path / "out"
    env = {**subprocess_env, "FRACFEAT_ID_SALT": "test-salt"}
    cmd = [sys.executable, "-m", "fracfeat", "run", str(root), "--out", str(out), "--weights", "none",
           "--image-size", "32", "--classifier", "logreg", "--trials", "2", "--cv", "2", "--test-size", "0.25", "--dicom-window", "widest", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.joblib").is_file() and (out / "report" / "index.html").is_file()
    assert "has no groups" not in done.stderr
    from fracfeat import FeatureStore
    from fracfeat._run import holdout_split

    fs = FeatureStore(out / "store").open()
    assert len(set(fs.groups)) == 8 and all(g.startswith("pt-") for g in fs.groups)
    train, held, how, grouped = holdout_split(fs, 0.25, 0)  # run's hold-out: no patient on both sides
    assert grouped and not set(train.groups) & set(held.groups)
    page = (out / "report" / "index.html").read_text()
    assert "North Hospital" in page and "Acme DR" in page  # evaluate's per-source table of the held-out images
    # the saved model reads new DICOM files as it read its training files: its reading settings replayed
    from fracfeat import predict
    from fracfeat._model_io import load_model

    model = load_model(out / "model.joblib")
    assert model.steps[0][1].dicom_window == "widest" and fs.provenance["dicom_window"] == "widest"
    new = [dicom_files["mono1"], dicom_files["jpeg_ll"] or dicom_files["rle"]]
    assert [0.0 <= r["probability"] <= 1.0 for r in predict(model, new)] == [True, True]
