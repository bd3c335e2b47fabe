"""Protocol choices of a set of runs, next to the paper's protocol.

Pure functions of the tidy run frame (:mod:`.collect`).  Each choice says what
the runs did, what the paper (or the NQ authors' official code) did, and
whether the two differ; :func:`differences_line` is the one line printed under
every table.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .collect import NA, setting_sort_key

__all__ = ["Choice", "choices", "differences", "differences_line", "PAPER_EPOCHS",
           "NOISY_ANN_COLUMN"]

PAPER_EPOCHS = 400
NOISY_ANN_COLUMN = "ANN (noise on)"
NQ = "NQ"
OFFICIAL = "the NQ official code"


@dataclass(frozen=True)
class Choice:
    name: str                 # "Checkpoint selection split"
    here: str                 # what the runs did
    paper: str                # what the reference did ("" if not compared)
    differs: bool | None      # None: not compared or not logged
    short: str = ""           # phrase for the differences line (when differs)
    ref: str = "the paper"    # the reference: "the paper" or "the NQ official code"


def _values(runs: pd.DataFrame, col: str, method: str | None = None) -> list[str]:
    if col not in runs.columns:
        return []
    sub = runs if method is None or "method" not in runs.columns else runs[runs["method"] == method]
    return sorted({str(v) for v in sub[col] if isinstance(v, str) and v != NA},
                  key=setting_sort_key)


def _has_method(runs: pd.DataFrame, method: str) -> bool:
    return "method" in runs.columns and bool((runs["method"] == method).any())


def _joined(vals: list[str]) -> str:
    return "/".join(vals) if vals else "not logged"


def _truthy(v: str) -> bool | None:
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    return None


def choices(runs: pd.DataFrame) -> list[Choice]:
    """The protocol choices of ``runs`` (one dataset block or a whole report)."""
    out: list[Choice] = []
    # epochs
    ep = _values(runs, "epochs")
    diff = None if not ep else any(setting_sort_key(v) != (0, float(PAPER_EPOCHS), "")
                                   for v in ep)
    out.append(Choice("Epochs", _joined(ep), f"{PAPER_EPOCHS}", diff,
                      f"{_joined(ep)} epochs (paper: {PAPER_EPOCHS})"))
    # checkpoint selection split
    sel = _values(runs, "select_on")
    sel_T = _values(runs, "select_T")
    here = (f"best converted SNN at T={'/'.join(sel_T)} on the {_joined(sel)} split"
            if sel else "not logged")
    diff = None if not sel else any(v != "test" for v in sel)
    out.append(Choice("Checkpoint selection split", here, "test set", diff,
                      f"checkpoint selected on the {_joined(sel)} split (paper: test set)"))
    # gradient formulation
    grad = _values(runs, "model.grad")
    diff = None if not grad else any(v != "nq" for v in grad)
    out.append(Choice("Gradient formulation (`model.grad`)", _joined(grad), "nq", diff,
                      f"gradient formulation {_joined(grad)} (paper: nq)"))
    has_nq = _has_method(runs, NQ)
    if has_nq:
        # calibration images augmented?
        aug = _values(runs, "noise.calib_augment", NQ)
        flags = [_truthy(v) for v in aug]
        here = ("/".join("augmented" if f else "not augmented" if f is False else v
                         for f, v in zip(flags, aug)) if aug else "not logged")
        diff = None if not aug or None in flags else not all(flags)
        out.append(Choice("NQ calibration images (`noise.calib_augment`)", here,
                          "augmented", diff,
                          f"NQ calibration images {here} (NQ official code: augmented)",
                          ref=OFFICIAL))
        # calibration subset: size and class counts (no paper value to compare)
        n_img = _values(runs, "calib.n_images", NQ)
        counts = _values(runs, "class_counts", NQ)
        out.append(Choice("NQ calibration subset", _calib_text(n_img, counts), "", None))
        # ANN column: noise off; the NQ authors measured their ANN with the noise on
        noisy = ("ann_noisy" in runs.columns
                 and runs.loc[runs["method"] == NQ, "ann_noisy"].notna().any())
        extra = (f"noise-on ANN accuracy in the “{NOISY_ANN_COLUMN}” column of Table 1" if noisy
                 else "noise-on ANN accuracy not logged for these runs")
        out.append(Choice("ANN column", f"noise off ({extra})", "noise on", True,
                          f"ANN column with noise off (NQ official code: noise on; {extra})",
                          ref=OFFICIAL))
    # data source
    roots = _values(runs, "data_root") if "data_root" in runs.columns else []
    jpeg = [r for r in roots if "cifar10-jpeg" in r.lower()]
    if jpeg:
        out.append(Choice("Data", "CIFAR-10 recompressed as JPEG", "original CIFAR-10", True,
                          "CIFAR-10 recompressed as JPEG"))
    return out


def _calib_text(n_img: list[str], counts: list[str]) -> str:
    parts = [f"{_joined(n_img)} images (`calib.n_images`)"]
    if not counts:
        parts.append("class counts not logged")
    elif len(counts) == 1:
        vals = counts[0].split(",")
        if len(vals) <= 12:
            parts.append(f"class counts {counts[0]} (`calib.class_counts`)")
        else:
            nums = [int(float(v)) for v in vals if v.strip()]
            parts.append(f"{len(nums)} classes, {min(nums)}–{max(nums)} images per class "
                         "(`calib.class_counts`)")
    else:
        parts.append(f"class counts differ between runs ({len(counts)} different; "
                     "per-trial values in the appendix)")
    return "; ".join(parts)


def differences(runs: pd.DataFrame) -> list[str]:
    """Phrases for the choices that differ from the paper, then the ones not logged."""
    cs = choices(runs)
    diff = [c.short for c in cs if c.differs]
    unknown = [c.name for c in cs if c.differs is None and c.paper and c.here == "not logged"]
    if unknown:
        diff.append("not logged: " + ", ".join(unknown))
    return diff


def differences_line(runs: pd.DataFrame) -> str:
    diff = differences(runs)
    return ("Protocol differences from the paper: " + ("; ".join(diff) if diff else
            "none among the checked choices (see the protocol section)") + ".")
