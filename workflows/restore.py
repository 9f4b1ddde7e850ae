"""``clearair restore`` and ``clearair score``: a trained model or the learned perceiver on user images."""

from __future__ import annotations

from pathlib import Path

from synth.imageio import IMAGE_EXTENSIONS


class RestoreError(RuntimeError):
    """A model, checkpoint or input that cannot be used; the message names it."""


def image_files(inputs: list[Path]) -> list[Path]:
    files = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise RestoreError(f"input {p} does not exist")
    return files


def _restorer(model: str | Path):
    from clearair.export import ExportFormatError
    from synth import storage
    from workflows.evaluation import load_restorer

    if storage.is_remote(model):  # an export (or a checkpoint) in an object store: read through a local copy
        try:
            model = storage.local_copy(model) if storage.is_file(model) else storage.local_tree(model)
        except OSError as err:
            raise RestoreError(f"cannot read {model}: {err}") from None
    model = Path(model)
    if model.is_file():  # a Lightning checkpoint of a training run
        from workflows.training import restorer_from_checkpoint

        try:
            return restorer_from_checkpoint(model), None
        except (KeyError, RuntimeError) as err:
            raise RestoreError(f"{model} is not a restorer checkpoint we can load: {err}") from None
    try:
        return load_restorer(model)
    except (ExportFormatError, FileNotFoundError, ValueError) as err:
        raise RestoreError(str(err)) from None


def restore_paths(
    model: str | Path, inputs: list[Path], out: Path, tile: int | None, overlap: int
) -> list[tuple[Path, Path]]:
    """Restore every image of ``inputs`` into ``out`` as PNG (any size: tiled with blending)."""
    import torch

    from clearair.inference import load_image, restore_image, save_image, to_numpy, to_tensor

    net, priors = _restorer(model)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    with torch.inference_mode():
        for path in image_files(inputs):
            try:
                img = load_image(path)
            except Exception as err:
                raise RestoreError(f"cannot read image {path}: {err}") from None
            x = to_tensor(img)[None]
            restored = to_numpy(restore_image(net, x, priors_fn=priors, tile=tile, overlap=overlap)[0])
            dst = out / f"{path.stem}.png"
            save_image(dst, restored)
            done.append((path, dst))
    return done


def score_paths(prompts: str | Path, inputs: list[Path]) -> list[tuple[Path, str, dict[str, float]]]:
    """Quality tier (low/medium/high) and the three probabilities of each image, by the learned prompts."""
    import json

    import torch
    from safetensors import safe_open

    from clearair.inference import load_image, to_tensor
    from clearair.models.perceiver import TIERS, PerceiverConfig, build_perceiver
    from synth import storage

    try:
        prompts = storage.local_copy(prompts)
    except OSError as err:
        raise RestoreError(f"cannot read prompts {prompts}: {err}") from None
    if not prompts.is_file():
        raise RestoreError(f"prompts file {prompts} not found (the perceiver stage writes prompts.safetensors)")
    with safe_open(str(prompts), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise RestoreError(f"{prompts} holds no perceiver config in its metadata: not a clearair prompts file")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["config"]).items()}
    perceiver = build_perceiver(PerceiverConfig(**fields))
    perceiver.load_prompts(prompts)
    rows = []
    with torch.inference_mode():
        for path in image_files(inputs):
            tier, probs = perceiver.predict(to_tensor(load_image(path))[None])
            rows.append((path, TIERS[int(tier[0])], {t: float(p) for t, p in zip(TIERS, probs[0], strict=True)}))
    return rows
