"""Which architectures each quantization flow takes (a survey, not a unit test).

    python benchmarks/arch_matrix.py [--archs resnet50,mobilenet_v2,...] [--size 32] [--timeout 600]

For every architecture and flow: build the model untrained (the flows do not care about the
weights), prepare it for static quantization, calibrate on two random batches, convert, run
it once and write the flow's deployment file with its export() (to a temporary folder); for
vit_tiny also the dynamic method. Each case runs in its own process (a crash or a hang is one
row), single-threaded. Prints a markdown table: "ok", "no twin", or the first line of the error.
"""
import argparse
import os
import subprocess
import sys
import tempfile

ARCHS = ("resnet18,resnet50,resnext50_32x4d,mobilenet_v2,mobilenet_v3_large,mobilenet_v3_small,"
         "shufflenet_v2_x1_0,efficientnet_b0,regnet_x_400mf,regnet_y_400mf,mnasnet1_0,googlenet,"
         "squeezenet1_1,densenet121,convnext_tiny,vgg11_bn,swin_t,vit_tiny")
FLOWS = ("eager", "fx", "pt2e")

CASE = r"""
import sys, warnings, torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from quantbench import models
from quantbench.errors import QuantbenchError
from quantbench.deploy import suffix
from quantbench.flows import get_flow
arch, flow_name, method, size, out = sys.argv[1:6]
flow = get_flow(flow_name)
x = torch.randn(2, 3, int(size), int(size))
try:
    model = models.build(arch, 10, quantizable=(flow_name == "eager" and method != "dynamic")).eval()
except QuantbenchError as e:
    print("no twin" if "twin" in str(e) else str(e)); sys.exit(0)
if method == "dynamic":
    q, _ = flow.quantize_dynamic(model, "default", x[:1])
else:
    p = flow.prepare(model, "default", qat=False, example=x[:1])
    with torch.no_grad():
        for _ in range(2):
            p(torch.randn(4, 3, int(size), int(size)))
    q = flow.convert(p)
with torch.no_grad():
    y = q(x)
assert y.shape == (2, 10), y.shape
flow.export(q, out + suffix(flow_name), x[:1])
print("ok")
"""


def run_case(arch: str, flow: str, method: str, size: int, timeout: int, tmp: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, "-c", CASE, arch, flow, method, str(size),
                            os.path.join(tmp, f"{arch}-{flow}-{method}")],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timeout ({timeout} s)"
    if p.returncode == 0:
        return p.stdout.strip().splitlines()[-1]
    err = [ln for ln in p.stderr.strip().splitlines() if ln and not ln.startswith((" ", "Traceback", "W"))]
    return (err[-1] if err else f"exit {p.returncode}")[:160].replace("|", "/")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--timeout", type=int, default=600)
    args = ap.parse_args()
    print("| arch | " + " | ".join(f"{f} static" for f in FLOWS) + " |")
    print("|---" * (len(FLOWS) + 1) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            cells = [run_case(arch, f, "static", args.size, args.timeout, tmp) for f in FLOWS]
            print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)
            if arch == "vit_tiny":
                cells = [run_case(arch, f, "dynamic", args.size, args.timeout, tmp) for f in FLOWS]
                print(f"| {arch} (dynamic) | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
