"""Extract deep features of a folder (or CSV manifest) into a versioned feature store.

    python3 examples/extract_folder.py ../shared/data/fracatlas \
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5

Run it twice: the second run finds every image in the store's cache and computes nothing.
"""

import argparse
import logging
import time

from fracfeat import FeatureStore, extract

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("source", help="folder of class folders, split folders, or a CSV manifest")
parser.add_argument("--store", default="fracfeat-store")
parser.add_argument("--backbone", default="vgg16")
parser.add_argument("--weights", default="imagenet", help="'imagenet', a Keras weights file, or 'none'")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s")

t = time.perf_counter()
fs = extract(args.source, backbone=args.backbone, store=args.store, weights=args.weights)
print(f"{fs!r} in {time.perf_counter() - t:.1f}s")
print(f"provenance: computed {fs.provenance['n_computed']} rows, reused {fs.provenance['n_reused']}")
for v in FeatureStore(args.store).versions():
    print(v.describe())
