"""Single-slice CT DICOM files the way the RSNA ICH challenge distributed them.

Flat folder of ``ID_<hex>.dcm`` files with opaque ``ID_...`` UIDs (not valid DICOM UIDs: RSNA
really did this, so writing validation is relaxed while these files are written), explicit VR
little endian, 16-bit pixels, full patient geometry in LPS. Identifying attributes always carry
marker values so de-identification downstream is always exercised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from ..io import atomic_path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1417.1"  # fixed: files must be byte-identical per seed
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


@contextlib.contextmanager
def lenient_uids():
    """Let pydicom write RSNA-style ``ID_...`` values into UI elements."""
    cfg = pydicom.config.settings
    saved = cfg.writing_validation_mode, cfg.reading_validation_mode
    cfg.writing_validation_mode = pydicom.config.IGNORE
    cfg.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        cfg.writing_validation_mode, cfg.reading_validation_mode = saved


def ds_str(v, nd=6) -> str:
    """A DS string (<= 16 chars) that parses back to the value used for rendering."""
    s = f"{round(float(v), nd):.{nd}f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    if len(s) > 16:
        s = f"{float(v):.10g}"[:16]
    return s


@dataclass
class Storage:
    """How HU become stored pixel values."""

    name: str  # unsigned | signed | signed0 | wrap12 | padded
    pixel_representation: int
    bits_stored: int
    intercept: float
    padding: int | None = None  # PixelPaddingValue (stored) outside the reconstruction circle

    def encode(self, hu: np.ndarray) -> np.ndarray:
        hu = np.rint(hu).astype(np.int32)
        if self.name == "wrap12":
            # the RSNA fault: 12-bit unsigned store of HU modulo 4096 with a 0 intercept
            stored = np.mod(np.clip(hu, -1000, 3000), 4096)
        else:
            stored = hu - int(self.intercept)
        if self.pixel_representation == 0:
            return np.clip(stored, 0, 2**self.bits_stored - 1).astype(np.uint16)
        return np.clip(stored, -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1).astype(np.int16)


STORAGES = {
    "unsigned": Storage("unsigned", 0, 12, -1024.0),
    "signed": Storage("signed", 1, 16, -1024.0),
    "signed0": Storage("signed0", 1, 16, 0.0),
    "wrap12": Storage("wrap12", 0, 12, 0.0),
    "padded": Storage("padded", 1, 16, 0.0, padding=-2000),
}


@dataclass
class Identity:
    """Identifying attributes of one study (patient values shared by the patient's studies)."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    other_ids: str
    accession: str
    institution: str
    referring: str
    study_date: str
    study_time: str

    def phi_values(self) -> list[str]:
        return [self.patient_name, self.patient_id, self.birth_date, self.accession, self.institution,
                self.referring, self.other_ids]


@dataclass
class SeriesInfo:
    """UIDs and study-level context shared by every file of a series."""

    study_uid: str
    series_uid: str
    frame_uid: str
    series_number: int
    identity: Identity
    description: str
    extra: dict = field(default_factory=dict)


def _base_dataset(info: SeriesInfo, sop_uid: str, sop_class: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HEMOCAM_PHANTOM"
    ds = Dataset()
    ds.file_meta = meta
    idn = info.identity
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for tag in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, tag, idn.study_date)
    for tag in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, tag, idn.study_time)
    ds.AccessionNumber = idn.accession
    ds.Modality = "CT"
    ds.Manufacturer = "HEMOCAM"
    ds.InstitutionName = idn.institution
    ds.ReferringPhysicianName = idn.referring
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
    ds.SeriesDescription = info.description
    ds.ManufacturerModelName = "PHANTOM CT"
    ds.PatientName = idn.patient_name
    ds.PatientID = idn.patient_id
    ds.PatientBirthDate = idn.birth_date
    ds.PatientSex = idn.sex
    ds.OtherPatientIDs = idn.other_ids
    ds.BodyPartExamined = "HEAD"
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = info.series_number
    ds.AcquisitionNumber = 1
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, storage: Storage):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = storage.bits_stored
    ds.HighBit = storage.bits_stored - 1
    ds.PixelRepresentation = storage.pixel_representation
    if storage.padding is not None:
        ds.PixelPaddingValue = storage.padding  # VR (US/SS) follows PixelRepresentation
    ds.RescaleIntercept = ds_str(storage.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def ct_slice_dataset(info: SeriesInfo, sop_uid: str, stored: np.ndarray, storage: Storage, *, ipp, iop,
                     spacing: float, thickness: float, instance: int, tilt: float, fov: float,
                     image_type=("ORIGINAL", "PRIMARY", "AXIAL"), window=(40, 80)) -> Dataset:
    """One axial CT image with full geometry (``ipp``/``iop`` in DICOM LPS)."""
    ds = _base_dataset(info, sop_uid, CT_IMAGE_STORAGE)
    ds.ImageType = list(image_type)
    ds.SliceThickness = ds_str(thickness)
    ds.KVP = "120"
    ds.DataCollectionDiameter = ds_str(fov)
    ds.ReconstructionDiameter = ds_str(fov)
    ds.GantryDetectorTilt = ds_str(tilt)
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "300"
    ds.ConvolutionKernel = "H30s"
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = int(instance)
    ds.ImagePositionPatient = [ds_str(v, 4) for v in ipp]
    ds.ImageOrientationPatient = [ds_str(v, 7) for v in iop]
    ds.FrameOfReferenceUID = info.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = ds_str(ipp[2], 4)
    ds.PixelSpacing = [ds_str(spacing), ds_str(spacing)]
    ds.WindowCenter = str(window[0])
    ds.WindowWidth = str(window[1])
    _set_pixels(ds, stored, storage)
    return ds


def localizer_dataset(info: SeriesInfo, sop_uid: str, image: np.ndarray, *, ipp, iop, spacing, instance) -> Dataset:
    """A scout (topogram): projection radiograph, ImageType ...\\LOCALIZER, not an axial slice."""
    ds = _base_dataset(info, sop_uid, CT_IMAGE_STORAGE)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = int(instance)
    ds.ImagePositionPatient = [ds_str(v, 4) for v in ipp]
    ds.ImageOrientationPatient = [ds_str(v, 7) for v in iop]
    ds.FrameOfReferenceUID = info.frame_uid
    ds.PixelSpacing = [ds_str(spacing), ds_str(spacing)]
    ds.SliceThickness = "1"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    _set_pixels(ds, image, Storage("scout", 0, 12, 0.0))
    ds.RescaleType = "US"
    return ds


def secondary_capture_dataset(info: SeriesInfo, sop_uid: str, page: np.ndarray) -> Dataset:
    """A dose-report style screenshot: Secondary Capture, 8-bit, no geometry."""
    ds = _base_dataset(info, sop_uid, SECONDARY_CAPTURE)
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = page.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(page.astype(np.uint8)).tobytes()
    return ds


def write_dataset(ds: Dataset, path):
    with lenient_uids(), atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def truncate_in_pixel_data(path, fraction=0.5):
    """Cut a written file in the middle of its pixel data (an interrupted copy)."""
    with lenient_uids():
        ds = pydicom.dcmread(path, stop_before_pixels=False)
    size = path.stat().st_size
    n_pixel = len(ds.PixelData)
    keep = size - n_pixel + int(n_pixel * fraction)
    with open(path, "r+b") as fp:
        fp.truncate(keep)


def lps_affine(ipp0, row, col, slice_step, spacing) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS affine of a DICOM slice stack."""
    m = np.eye(4)
    m[:3, 0] = np.asarray(row) * spacing
    m[:3, 1] = np.asarray(col) * spacing
    m[:3, 2] = slice_step
    m[:3, 3] = ipp0
    out = np.eye(4)
    out[:3] = RAS_FROM_LPS @ m[:3]
    return out
