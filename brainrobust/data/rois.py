"""Category-selective ROI definitions and FreeSurfer colour-table (ctab) parsing.

An ROI is a set of label names inside one NSD localiser volume (floc-faces, floc-bodies,
floc-places). The integer code of each label is read from the subject's ctab file rather than
assumed, because the codes are a property of the release, not of this package.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainrobust import CONF_DIR
from brainrobust.data.datafiles import unreadable
from brainrobust.errors import ConfigError, DataError

HEMIS = ("both", "lh", "rh")


@dataclass(frozen=True)
class ROISpec:
    """One ROI: label names looked up in a localiser volume's ctab.

    Parameters
    ----------
    name : str
        Name used as the key of the ROI everywhere downstream ("FFA").
    file : str
        Localiser stem: "floc-faces" reads floc-faces.nii.gz (hemi both) or lh./rh. versions.
    labels : sequence of str
        ctab label names whose voxels form the ROI ("FFA-1", "FFA-2").
    hemi : str
        "both", "lh" or "rh".
    """

    name: str
    file: str
    labels: tuple[str, ...]
    hemi: str = "both"

    def __post_init__(self) -> None:
        # Hydra passes labels as a list (or ListConfig); the spec must stay hashable.
        labels = (self.labels,) if isinstance(self.labels, str) else tuple(map(str, self.labels))
        object.__setattr__(self, "labels", labels)
        if not labels:
            raise ConfigError(f"ROI {self.name!r} has no labels; list ctab names, e.g. [FFA-1]")
        if self.hemi not in HEMIS:
            raise ConfigError(f"ROI {self.name!r}: hemi {self.hemi!r} unknown; valid: {HEMIS}")

    @property
    def volume_stem(self) -> str:
        """File stem of the volume holding this ROI's hemisphere ("lh.floc-faces")."""
        return self.file if self.hemi == "both" else f"{self.hemi}.{self.file}"


# The NSD ROIs: one conf/roi/<NAME>.yaml each, the file a run selects with roi=NAME.
ROI_DIR = CONF_DIR / "roi"


def builtin_names() -> list[str]:
    """Names accepted by `builtin_roi` (each also with an "lh." or "rh." prefix)."""
    return sorted(path.stem for path in ROI_DIR.glob("*.yaml"))


@functools.cache  # a YAML read per name: sweeps and the fetch plan ask for the same ROIs often
def builtin_roi(name: str) -> ROISpec:
    """The NSD definition of a named ROI (conf/roi/<name>.yaml); "lh.FFA" / "rh.FFA" select one
    hemisphere.

    Raises ConfigError listing the valid names for an unknown name.
    """
    from omegaconf import OmegaConf

    hemi, base = None, name
    if name[:3] in ("lh.", "rh."):
        hemi, base = name[:2], name[3:]
    path = ROI_DIR / f"{base}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown ROI {name!r}; valid: {', '.join(builtin_names())} (optionally prefixed "
            "lh./rh.), or add conf/roi/<NAME>.yaml with a ROISpec"
        )
    node = OmegaConf.load(path).get(base)
    if node is None:
        raise ConfigError(f"{path} must hold one ROI named {base!r} (its file name)")
    return ROISpec(name=name, file=str(node.file), labels=tuple(node.labels),
                   hemi=hemi or str(node.get("hemi", "both")))


def as_roi_specs(rois: ROISpec | str | Iterable[ROISpec | str]) -> list[ROISpec]:
    """Normalise one ROI or a sequence of them to ROISpecs with distinct names."""
    items: Sequence = [rois] if isinstance(rois, (ROISpec, str)) else list(rois)
    specs = [r if isinstance(r, ROISpec) else builtin_roi(str(r)) for r in items]
    if not specs:
        raise ConfigError("no ROI given; pass e.g. rois='FFA' or ['FFA', 'PPA']")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"ROI names must be distinct, got {names}")
    return specs


def read_ctab(path: str | os.PathLike) -> dict[str, int]:
    """Parse a FreeSurfer colour table: '<int> <name> [r g b a]' per line -> {name: code}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise unreadable(path, err, "the NSD root") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text label table; re-download it") from None
    table: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            table[fields[1]] = int(fields[0])
        except (ValueError, IndexError):
            raise DataError(
                f"{path}:{lineno}: expected '<int> <name>', got {line.strip()!r}; re-download it"
            ) from None
    return table


def label_codes(spec: ROISpec, table: dict[str, int], table_path: str | os.PathLike) -> list[int]:
    """Codes of the spec's labels in a parsed label table; DataError naming a missing label."""
    missing = [lab for lab in spec.labels if lab not in table]
    if missing:
        raise DataError(
            f"label {missing[0]!r} of ROI {spec.name!r} not in {table_path} "
            f"(it lists {sorted(table)}); fix the ROI's labels or the file"
        )
    return [table[lab] for lab in spec.labels]


def roi_mask(volume: np.ndarray, codes: Sequence[int]) -> np.ndarray:
    """Boolean mask of the voxels whose label code is one of `codes` (codes > 0 only)."""
    return np.isin(volume, [c for c in codes if c > 0])
