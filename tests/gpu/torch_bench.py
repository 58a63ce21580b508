"""The practical limit for the GPU throughput benchmark: the same ResNet-50 (random weights) in
PyTorch on the same GPU, input already on the GPU, timed with CUDA events (median of the timed
runs after warm-up). Prints one line per (precision, batch). Usage: python torch_bench.py BATCHES"""
import statistics
import sys

import torch
import torchvision

batches = [int(b) for b in sys.argv[1].split(",")]
torch.backends.cudnn.benchmark = True
net = torchvision.models.resnet50(weights=None).eval().cuda()
for label, dtype, tf32, channels_last in [
    ("fp32", torch.float32, False, False),
    ("fp32-tf32", torch.float32, True, False),
    ("fp16-channels-last", torch.float16, False, True),
]:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model = net.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for n in batches:
        x = torch.rand(n, 3, 224, 224, device="cuda", dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        times = []
        with torch.inference_mode():
            for i in range(8 + 20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.softmax(model(x).float(), dim=1)
                end.record()
                end.synchronize()
                if i >= 8:
                    times.append(start.elapsed_time(end) / 1e3)
        median = statistics.median(times)
        print(f"torch precision={label} batch={n} median_ms={median * 1e3:.3f} tiles_per_s={n / median:.0f}", flush=True)
