"""Run config presets shipped with the platform (``configs/*.yaml``)."""

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent


def preset_path(name: str) -> Path:
    """Path of preset ``name`` (``"tnl-tiny"`` or ``"tnl-tiny.yaml"``)."""
    path = PRESET_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no preset {name!r}; known presets: {known}")
    return path
