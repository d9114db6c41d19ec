"""The demo model pair shipped with the package, its task, and how it was trained."""

from pathlib import Path

PAIR_DIR = Path(__file__).parent / "pair"


def pair_paths() -> tuple[Path, Path]:
    """(small, big) checkpoint folders of the shipped demo pair."""
    small, big = PAIR_DIR / "small", PAIR_DIR / "big"
    for folder in (small, big):
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"the demo pair is missing {folder / 'model.safetensors'}: reinstall the package, "
                                    "or train it with `splitreason train-demo`")
    return small, big
