"""Speed of nucleiseg-monai, measured side by side in one run, to a JSON file and the console.

1. ``reference``: the reference notebooks' U-Net (64-512 features, 3 poolings) as a plain float32 PyTorch forward;
2. per bundle, ``network``: its network as its predictor runs it, and ``end_to_end``: file to all outputs with
   ``SlidePredictor.from_bundle``, on a synthetic tile and on a tile of real CryoNuSeg tissue, in megapixels per
   second and as ratios to the reference measured in the same run;
3. ``levers``: a lever table for one bundle's network (precision, layout, runtime, compilation, threads, tile,
   batch, width) and the cost of post-processing per megapixel;
4. ``training``: the bundle's train.json against a plain PyTorch loop on the same network and ``DataLoader``;
5. peak resident memory per phase (``common.Phases``); on CUDA (when present) the same figures again.

OpenVINO models are kept in a cache of the run's own (``nucleiseg_monai.openvino_cache``), so that each run makes
them once, as a first run on a new machine would.

Run from the repository root::

    python -m benchmarks.speed                               # full size
    python -m benchmarks.speed --quick --output /tmp/speed.json   # tiny sizes, a smoke test
"""

from .common import environment, sig

__all__ = ["environment", "sig"]
