#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target (tests/fuzz/corpus/<target>/) from the repository's
own files and a few hand-made cases. Standard library only; rerun after a manifest changes."""
import json, struct, zipfile, io, pathlib, shutil

root = pathlib.Path(__file__).resolve().parents[2]
corpus = root / "tests/fuzz/corpus"


def put(target, name, data):
    folder = corpus / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


for target in ["manifest", "features", "csv_batch", "embeddings", "tiff", "dicom", "archive"]:
    shutil.rmtree(corpus / target, ignore_errors=True)

# Manifests: every bundled model's and every test fixture's.
for manifest in sorted(root.glob("models/*/manifest.json")) + sorted(root.glob("tests/fixtures/models/*/manifest.json")):
    put("manifest", manifest.parent.name + ".json", manifest.read_bytes())

# Features and CSV rows for the GBSG2 model (numeric and categorical inputs).
gbsg2 = json.loads((root / "models/breast-recurrence-gbsg2/manifest.json").read_text())
names = [i["name"] for i in gbsg2["inputs"]]
example = {}
for spec in gbsg2["inputs"]:
    if spec.get("levels"):
        example[spec["name"]] = spec["levels"][0]
    else:
        lo, hi = spec.get("training_range", [0, 1])
        example[spec["name"]] = (lo + hi) / 2
put("features", "valid.json", json.dumps(example))
put("features", "empty.json", "{}")
put("features", "wrong-types.json", json.dumps({n: "x" for n in names}))
put("features", "extremes.json", json.dumps({n: 1e308 for n in names}))
header = ",".join(names + ["subject"])
row = ",".join(str(example[n]) for n in names)
put("csv_batch", "valid.csv", f"{header}\n{row},ACC-1\n{row},ACC-2\n")
put("csv_batch", "quoted.csv", f"{header}\n" + ",".join(f'"{example[n]}"' for n in names) + ',"A ""B"""\n')
put("csv_batch", "short-row.csv", f"{header}\n{row}\n1,2\n")

# Tile embeddings (safetensors): a valid bag with coordinates, and one with an unknown tensor.
def safetensors(tensors, metadata=None):
    header, data = {}, b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data

emb = struct.pack("<8f", *[0.1 * i for i in range(8)])
coords = struct.pack("<4q", 0, 0, 256, 0)
put("embeddings", "bag.safetensors", safetensors({"embeddings": ("F32", [2, 4], emb), "coords": ("I64", [2, 2], coords)}, {"encoder": "test"}))
put("embeddings", "extra-tensor.safetensors", safetensors({"embeddings": ("F32", [2, 4], emb), "other": ("F32", [2, 4], emb)}))
put("embeddings", "f64.safetensors", safetensors({"embeddings": ("F64", [1, 2], struct.pack("<2d", 1.0, 2.0))}))

# TIFFs: the small generic fixture, and hand-made tiled directories.
put("tiff", "generic-boxes.tiff", (root / "tests/fixtures/slides/generic-boxes.tiff").read_bytes())

def tiff(entries, next_ifd=0, tail=b"\0" * 64):
    out = b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHII", tag, kind, count, value)
    return out + struct.pack("<I", next_ifd) + tail

def level(width, height, at, size):
    return [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 7), (262, 3, 1, 2),
            (277, 3, 1, 3), (322, 3, 1, 256), (323, 3, 1, 256), (324, 4, 1, at), (325, 4, 1, size)]

put("tiff", "one-tile.tiff", tiff(level(256, 256, 160, 16)))
put("tiff", "huge.tiff", tiff(level(0xFFFFFFFF, 0xFFFFFFFF, 160, 16)))
put("tiff", "loop.tiff", tiff(level(512, 512, 160, 16), next_ifd=8))

# DICOM WSI instances: the head (first 64 KiB, libFuzzer's -max_len) of each fixture instance,
# which holds the data set, the frame table and the first frames.
for instance in sorted(root.glob("tests/fixtures/slides/**/*.dcm")):
    put("dicom", instance.stem + "-head.dcm", instance.read_bytes()[:65536])
# libFuzzer's finding (2026-11-30): (0020,0052)'s VR "UI" turned into "_I". dicom-rs reads an
# unknown VR's length from the next 4 bytes: the UID's text, "1.2." = a 775,040,561-byte value,
# reserved before anything was read.
head = (root / "tests/fixtures/slides/dicom/cmu1-thumbnail.dcm").read_bytes()[:65536]
at = head.index(b"\x20\x00\x52\x00UI")
put("dicom", "finding-unknown-vr-length.dcm", head[:at + 4] + b"_I" + head[at + 6:])

# Archives: a MIRAX-shaped zip, a DICOM-shaped zip, and one with an unsafe path.
def zipped(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buffer.getvalue()

put("archive", "mirax.zip", zipped([("case.mrxs", "[GENERAL]\n"), ("case/Slidedat.ini", "[GENERAL]\nSLIDE_VERSION = 01.02\n")]))
put("archive", "dicom.zip", zipped([("a.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64)]))
put("archive", "unsafe.zip", zipped([("../escaped.mrxs", "x")]))
print("corpus written to", corpus)
