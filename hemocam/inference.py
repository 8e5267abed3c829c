"""Inference with bundles from an earlier run (config ``model.classifier`` / ``model.segmenter``).

A bundle records the preprocessing it was trained on (input size, CT windows), the classifier
its label set and the segmenter its mask threshold. A new cohort must be preprocessed the same
way and cut at the same threshold, so those values come from the bundle; a config that sets one
of them to something else on purpose is refused with a message that names the key, the bundle
and both values, never silently overridden.
"""

from __future__ import annotations

from pathlib import Path

# the bundle kinds each model.<role> accepts (an ensemble of classifiers or of U-Nets is one model)
KINDS = {"classifier": ("resnet_lstm", "resnet_lstm_ensemble"), "segmenter": ("unet", "unet_ensemble")}


class BundleMismatch(ValueError):
    """The bundles and the config disagree on how scans are prepared or labelled."""


def bundle_settings(path, role: str) -> dict:
    """``{"size", "windows", "labels" | "threshold"}`` recorded in a classifier or segmenter bundle.

    ``role`` is the config key under ``model`` (``classifier`` or ``segmenter``); a missing,
    unreadable or wrong kind of file is an error naming ``model.<role>`` and the path.
    """
    import torch

    path = Path(path)
    key = f"model.{role}"
    if not path.is_file():
        raise BundleMismatch(f"{key}: no bundle at {path} (relative paths are read from the working "
                             "directory, snakemake -d)")
    try:
        # mmap: only the header and the small values are read, not the weights
        bundle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise BundleMismatch(f"{key}: {path} is not a readable bundle ({type(exc).__name__}: {exc})") from None
    if not isinstance(bundle, dict) or bundle.get("kind") not in KINDS[role]:
        kind = bundle.get("kind") if isinstance(bundle, dict) else type(bundle).__name__
        raise BundleMismatch(f"{key}: {path} is a {kind!r} bundle, not a {role} ({' or '.join(KINDS[role])})")
    out = {"size": int(bundle["size"]), "windows": [dict(w) for w in bundle["windows"]]}
    if role == "classifier":
        out["labels"] = list(bundle["labels"])
    else:
        # the masks are cut at the bundle's threshold (its validation picked the kept epoch there)
        out["threshold"] = float(bundle["threshold"])
    return out


def _same_windows(a, b) -> bool:
    def key(ws):
        return [(str(w["name"]), float(w["center"]), float(w["width"])) for w in ws]

    return key(a) == key(b)


def _differs(key: str, a, b) -> bool:
    return not _same_windows(a, b) if key == "windows" else a != b


def adopt_bundle_settings(config: dict, user_config: dict, bundles: dict) -> list[str]:
    """Make ``config`` use the bundles' preprocessing, labels and threshold; return what was changed.

    ``bundles``: role -> path for the bundles that are set. ``user_config``: what the user's
    own config files and --config set (not the shipped defaults): a value set there that
    differs from a bundle's is an error; a default is replaced by the bundle's value.
    """
    settings = {role: bundle_settings(path, role) for role, path in bundles.items() if path}
    if not settings:
        return []
    places = {"size": ("preprocess", "size"), "windows": ("preprocess", "windows"), "labels": ("classifier", "labels"),
              "threshold": ("segmenter", "threshold")}
    changed = []
    for name, (section, key) in places.items():
        found = {role: s[name] for role, s in settings.items() if name in s}
        if not found:
            continue
        (role0, value), *others = found.items()
        for role, other in others:
            if _differs(name, value, other):
                raise BundleMismatch(
                    f"model.{role0} and model.{role} were trained with different {section}.{key}: "
                    f"{value} vs {other}; use bundles from the same run")
        user = user_config.get(section, {})
        if key in user and _differs(name, user[key], value):
            raise BundleMismatch(
                f"{section}.{key} is set to {user[key]} in the config, but model.{role0} "
                f"({bundles[role0]}) was trained with {value}: remove the setting (the bundle's value is "
                "used) or use a bundle trained with it")
        if _differs(name, config[section][key], value):
            changed.append(f"{section}.{key}: {config[section][key]} -> {value} (from model.{role0})")
            config[section][key] = value
    return changed
