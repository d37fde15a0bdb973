"""A Pillow RGB image's pixels as a numpy array without copying them, through the Arrow C data interface.

`np.asarray(im)` packs Pillow's 4-byte pixels into a new 3-byte buffer. Pillow (>= 13 here) exports its own memory
as Arrow instead; torch's antialiased resize takes 4-channel pixels as they are (its uint8 kernel works on 4 channels
anyway), and the crop keeps 3 of them: a copy less per image (bench/README.md, "Pillow's pixels read uncopied").
"""

from __future__ import annotations

import ctypes

import numpy as np
import PIL
from PIL import Image

# Pillow 11.2-12.x export padded rows (PILLOW_ALIGNMENT) as if they were packed, and crash exporting a 0-pixel
# image; from 13 on, an image Pillow cannot export as packed rows is copied.
EXPORTS_PACKED_ROWS = int(PIL.__version__.split(".")[0]) >= 13


class _ArrowSchema(ctypes.Structure):
    pass


class _ArrowArray(ctypes.Structure):
    pass


# https://arrow.apache.org/docs/format/CDataInterface.html: a stable C ABI, the same in every producer
_ArrowSchema._fields_ = [("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
                         ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
                         ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
                         ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                         ("private_data", ctypes.c_void_p)]
_ArrowArray._fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
                        ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
                        ("buffers", ctypes.POINTER(ctypes.c_void_p)),
                        ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
                        ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                        ("private_data", ctypes.c_void_p)]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def rgb_pixels(im: Image.Image) -> np.ndarray:
    """(H, W, 4) read-only view of an RGB image's memory (channel 4 unused), or a packed (H, W, 3) copy where Pillow
    cannot export it whole (Pillow < 13, an image spread over several memory blocks, another mode).

    The view stays valid after `im` is gone: it holds the exported array, whose release tells Pillow."""
    if im.mode != "RGB" or not EXPORTS_PACKED_ROWS:
        return np.asarray(im)
    try:
        schema_capsule, array_capsule = im.__arrow_c_array__()
    except ValueError:  # "Image rows are not contiguous in memory"
        return np.asarray(im)
    schema = ctypes.cast(_capsule_pointer(schema_capsule, b"arrow_schema"), ctypes.POINTER(_ArrowSchema)).contents
    array = ctypes.cast(_capsule_pointer(array_capsule, b"arrow_array"), ctypes.POINTER(_ArrowArray)).contents
    pixels = im.width * im.height
    if not (schema.format == b"+w:4" and schema.n_children == 1 and schema.children[0].contents.format == b"C"
            and array.length == pixels and array.offset == 0 and array.n_children == 1):
        return np.asarray(im)  # a layout this reader does not know
    child = array.children[0].contents
    if child.length != 4 * pixels or child.offset != 0 or child.n_buffers != 2 or not child.buffers[1]:
        return np.asarray(im)
    memory = (ctypes.c_uint8 * (4 * pixels)).from_address(child.buffers[1])
    memory.owner = (schema_capsule, array_capsule)  # released (and Pillow told) when the last view goes
    view = np.frombuffer(memory, np.uint8).reshape(im.height, im.width, 4)
    view.flags.writeable = False
    return view
