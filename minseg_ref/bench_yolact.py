"""`minseg bench` rows for YOLACT. The original cannot be installed here, so minseg's own time for the full
eval path (network + Detect + postprocess at 550x550, with the fixture's synthetic-weight recipe so that
Fast NMS and the masks see 100 detections) is reported beside the published Titan Xp figure."""
from __future__ import annotations

import torch

from minseg_ref.bench import BenchRow, ours_only

PUBLISHED_FPS = {"yolact_resnet50": 42.5, "yolact_resnet101": 33.5, "yolact_darknet53": 40.0, "yolact_im700": 23.6}


def synthetic_model(arch: str):
    """arch with weights from the shared synthetic recipe (the fixture's overrides) over its original key list."""
    import minseg
    from minseg_ref.common import load_synth
    from minseg_ref.parity_yolact import VARIANTS, load_fixture, yolact_keys

    _, meta, _ = load_fixture()
    overrides = {suffix: tuple(v) for suffix, v in meta["overrides"].items()}
    state = load_synth().synth_state(yolact_keys(VARIANTS[arch][0]), meta.get("base_seed", 0), overrides)
    model = minseg.create_model(arch)
    model.load_state_dict(minseg.convert("yolact", state, arch=arch), strict=True)
    return model.eval()


def forwards(arch: str, device: str) -> dict:
    """{"ours": the full eval path on one seeded SxS image}; there is no original to run."""
    from minseg_ref.parity_yolact import VARIANTS

    model = synthetic_model(arch).to(device)
    S = VARIANTS[arch][3]
    x = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1)).to(device)
    return {"ours": lambda: model.postprocess(model(x), [(480, 640)])}


def bench(arch: str, device: str, repeats: int) -> BenchRow:
    from minseg_ref.parity_yolact import VARIANTS

    ms, peak = ours_only(forwards, [arch], device, repeats)
    S, fps = VARIANTS[arch][3], PUBLISHED_FPS[arch]
    return BenchRow(arch, device, f"1x3x{S}x{S} -> 640x480", ms, None, peak, None,
                    f"original not runnable here; published {fps} fps = {1000 / fps:.1f} ms on a Titan Xp")


BENCHES = {arch: (lambda device, repeats, arch=arch: bench(arch, device, repeats)) for arch in PUBLISHED_FPS}
