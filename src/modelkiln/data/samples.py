"""Built-in sample images so commands run on a fresh machine with no data of the user's.

We ship no photos ourselves: the sample comes from a dependency, matplotlib's sample data
(``grace_hopper.jpg``, a public-domain U.S. Navy portrait).
"""

from __future__ import annotations

from pathlib import Path

from modelkiln._deps import require
from modelkiln.errors import ModelNotFound

SAMPLE_NAMES = ("grace_hopper.jpg",)


def sample_images(names: tuple[str, ...] = SAMPLE_NAMES) -> list[Path]:
    """Paths of the built-in sample images (matplotlib sample-data file names)."""
    cbook = require("matplotlib.cbook", "built-in sample images")
    paths = []
    for name in names:
        path = Path(cbook.get_sample_data(name, asfileobj=False))
        if not path.is_file():
            raise ModelNotFound(f"sample image {name} is missing from matplotlib's sample data")
        paths.append(path)
    return paths
