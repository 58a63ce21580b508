"""A THROUGHPUT FIXTURE, not a model: torchvision's ResNet-50 architecture with RANDOM weights
(seeded), exported to ONNX as a slide tile classifier ([N, 3, 224, 224] ImageNet-normalised RGB at
0.25 µm/pixel -> [N, 1000] softmax probabilities), once in float32 and once with float16 weights and
arithmetic behind float32 inputs and outputs. Its outputs mean nothing; it exists to measure how fast
a ResNet-50-class network runs through onkos. Usage: python export_resnet.py MODELS_DIR
(writes MODELS_DIR/resnet50-fixture and MODELS_DIR/resnet50-fixture-fp16, each with a manifest).
"""
import hashlib
import json
import pathlib
import sys
import warnings

import torch
import torchvision

warnings.filterwarnings("ignore")
out = pathlib.Path(sys.argv[1])
torch.manual_seed(20261130)
net = torchvision.models.resnet50(weights=None).eval()


class Softmax(torch.nn.Module):
    def __init__(self, inner, half):
        super().__init__()
        self.inner = inner.half() if half else inner
        self.half_ = half

    def forward(self, image):
        x = image.half() if self.half_ else image
        return torch.softmax(self.inner(x).float(), dim=1)


def export(module, path):
    example = torch.rand(2, 3, 224, 224)
    try:
        torch.onnx.export(module, (example,), str(path), input_names=["image"],
                          output_names=["probabilities"], opset_version=17,
                          dynamic_axes={"image": {0: "n"}, "probabilities": {0: "n"}}, dynamo=False)
    except Exception as e:  # the TorchScript exporter may be gone: the dynamo one instead
        print(f"TorchScript export failed ({e}); using dynamo", file=sys.stderr)
        n = torch.export.Dim("n", min=1, max=4096)
        torch.onnx.export(module, (example,), str(path), input_names=["image"],
                          output_names=["probabilities"], dynamic_shapes={"image": {0: n}},
                          dynamo=True, external_data=False)


for name, half in [("resnet50-fixture", False), ("resnet50-fixture-fp16", True)]:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    module = Softmax(net if not half else torchvision.models.resnet50(weights=None).eval(), half)
    if half:
        module.inner.load_state_dict({k: v.half() for k, v in net.state_dict().items()})
    with torch.no_grad():
        export(module, folder / "model.onnx")
    digest = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    manifest = {
        "schema": "onkos.manifest/2",
        "name": name,
        "version": "0.1.0",
        "modality": "slide",
        "task": "classification",
        "title": "THROUGHPUT FIXTURE: ResNet-50 architecture with random weights"
        + (" (float16)" if half else ""),
        "onnx": {"file": "model.onnx", "sha256": digest, "input": "image",
                 "input_type": "float32", "outputs": {}},
        "classification": None, "survival": None, "explanation": None, "cohort": None,
        "metrics": {"note": "random weights: no metric"},
        "hazard_ratios": None,
        "intended_use": "Throughput fixture only; not a model.",
        "slide": {
            "tile_size": 224, "mpp": 0.25, "min_tissue": 0.25,
            "normalise": {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225]},
            "measures": [{"name": "p_class_0", "output": "probabilities", "column": 0,
                          "unit": "probability", "description": "mean of column 0 (meaningless)",
                          "aggregation": {"kind": "mean"}}],
            "heatmap": "p_class_0",
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"exported {name}: {(folder / 'model.onnx').stat().st_size} bytes, sha256 {digest[:12]}")
