"""Write scikit-learn's digits as an image folder of PNG files, for the image-folder path.

    python experiments/make_digits_imagefolder.py data/digits_png
    jaxdl train --config experiments/imagefolder_cnn.py \
        --config.data.source=imagefolder:data/digits_png --config.data.image_size=32 \
        --workdir runs/digits_png_cnn

Layout: DIR/{train,val,test}/<digit>/<index>.png, the same fixed stratified split as the
"digits" source; pixels 0..16 are stored as 8-bit grayscale 0..240.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from jaxdl.data.digits import split_indices


def write_digits_folder(root: Path) -> dict[str, int]:
    digits = load_digits()
    counts = {}
    for split, indices in split_indices().items():
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * 15).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
        counts[split] = len(indices)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/make_digits_imagefolder.py OUT_DIR")
    print(write_digits_folder(Path(sys.argv[1])))
