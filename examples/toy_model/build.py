"""The toy model's builder lives in the package (``edgemind.examples.toy``) so that it
works after ``pip install``; this module keeps the repository's old import path.

    python -m examples.toy_model.build OUT_DIR [--seed N] [--overwrite]
"""

from __future__ import annotations

from edgemind.examples.toy import (
    INPUT_DIM,
    LAYERS,
    MODEL_NAME,
    NUM_CLASSES,
    build_toy_model,
    main,
)

__all__ = ["INPUT_DIM", "LAYERS", "MODEL_NAME", "NUM_CLASSES", "build_toy_model", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
