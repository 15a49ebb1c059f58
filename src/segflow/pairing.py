"""Which files are images, what their ids are, and which mask belongs to each: one meaning of
``--image-glob``, ``--image-pattern``, ``--mask-template`` and ``--pairs`` for ``segflow
ingest`` (the ``folder`` layout), ``segflow predict``, ``segflow evaluate`` and ``segflow crops``.

Two ways to pair (docs/dataset.md, "Pairing images and masks"):

* **by name**: an image is a file whose path (relative to its root) matches ``image_glob`` and,
  when given, the regex ``image_pattern`` (a full match, with a named group ``id``; a group
  named ``group`` sets the row's group). Its mask is ``mask_template`` filled with ``{id}``,
  ``{stem}``, ``{name}``, ``{ext}`` and the pattern's named groups, relative to the image's
  folder (``../1st_manual/{id}_manual1.gif`` names a sibling folder) or, with a leading ``/``,
  to the masks' root. Without a pattern the id is the path without its suffix (``sub/a``) and
  ``{id}`` is the file's stem.
* **a pairs CSV** (``pairs``, as MONAI's datalists): columns ``image`` and ``mask`` (or
  ``label``), optional ``group`` and ``id``; paths relative to the CSV's folder or absolute
  URLs, inside the image (mask) root; a command that reads no image (evaluate) takes the image
  cell from anywhere, as the row's name. The id is the ``id`` cell, else the image's stem.

A pairing that cannot be right (a pattern that matches nothing, a template that names an
unknown field, two images naming one mask, a CSV without its columns) is a
:class:`PairingError` that shows one example of each side; a row of a pairs CSV whose file is
missing or outside the root is dropped with its reason (:class:`Dropped`) and the rest goes on,
and so is a second image of one id (:func:`first_per_id`, for evaluate and crops; ingest and
predict drop those where their rows are planned).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import posixpath
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from segflow.errors import PairingError
from segflow.imaging import IMAGE_SUFFIXES
from segflow.storage import FileInfo, StorageError, StorageOptions, Store, split_url

#: the option texts, shared by every command's flag and config key
IMAGE_PATTERN_HELP = (
    "regex with a named group id, fully matched against each path relative to the source, "
    r"e.g. 'images/(?P<id>\d+)_test\.tif'; a group named group sets the row's group "
    "(grouped K-fold split); the id names the row and its mask"
)
MASK_TEMPLATE_HELP = (
    "mask path of an image from {id}, {stem}, {name}, {ext} and --image-pattern's named "
    "groups, relative to the image's folder ('../1st_manual/{id}_manual1.gif' names a sibling "
    "folder) or, with a leading /, to the masks' root"
)
PAIRS_HELP = (
    "CSV of image,mask[,group][,id] rows (as MONAI datalists; 'label' is read as mask); paths "
    "relative to the CSV's folder or absolute URLs, inside the source (masks); the id defaults "
    "to the image's file name without suffix"
)
_MASK_COLUMNS = ("mask", "label")
_SHOWN = 3  # example file names an error message lists


@dataclass(frozen=True)
class Pairing:
    """How images are found and paired with masks (see the module doc)."""

    image_glob: str = "*"
    image_pattern: str | None = None
    mask_template: str | None = None  # None: no mask is looked for (predict)
    pairs: str | None = None  # URL of a pairs CSV: replaces the three fields above


@dataclass(frozen=True)
class Candidate:
    """One image and the path its mask must have (``None``: it names no mask)."""

    id: str
    group: str
    image: FileInfo  # rel: relative to the image root
    mask: str | None  # relative to the masks' root; the file may not exist (name pairing)


@dataclass(frozen=True)
class Dropped:
    """A pairs-CSV row that is left out, and why (a reason from imaging.REASONS)."""

    file: str  # URL of the file at fault
    reason: str
    detail: str
    id: str = ""


@dataclass
class Paired:
    candidates: list[Candidate]
    dropped: list[Dropped] = field(default_factory=list)


def _q(option: str) -> str:
    """An option value quoted as a shell takes it (a regex's backslashes stay single)."""
    return f"'{option}'"


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot name a row and its output files, or ``None`` when it can. An
    id becomes a path (``masks/<id>.png``), so it may hold ``/`` (sub-folders, as the folder
    layout's ``sub/a``) but no empty, ``.`` or ``..`` part (between ``/`` or ``\\``), no leading
    ``/`` or ``\\`` and no control character: it would escape or break the output store."""
    if not image_id.strip():
        return "the id is empty"
    bad = next((c for c in image_id if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"the id {image_id!r} holds the control character {bad!r}"
    if image_id.startswith(("/", "\\")):
        return f"the id {image_id!r} starts with {image_id[0]!r}; it would name a root path"
    if any(part in ("", ".", "..") for part in re.split(r"[/\\]", image_id)):
        return f"the id {image_id!r} has an empty, '.' or '..' part; it would leave its folder"
    return None


# -- by name ------------------------------------------------------------------------------------
def compile_image_pattern(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise PairingError(f"--image-pattern {_q(pattern)} is not a valid regex: {e}") from None
    if "id" not in rx.groupindex:
        raise PairingError(
            f"--image-pattern {_q(pattern)} has no named group id; name the part that identifies "
            rf"an image, e.g. '(?P<id>\d+)_test\.tif' for 01_test.tif (id 01)"
        )
    return rx


def template_fields(template: str) -> list[str]:
    """The field names ``template`` uses; a malformed template is a :class:`PairingError`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PairingError(
            f"--mask-template {_q(template)} is not a valid template ({e}); write fields as {{id}}"
        ) from None
    return [name for _, name, _, _ in parsed if name is not None]


def check_template(template: str, known: Sequence[str], example: str | None = None) -> None:
    """Every field of ``template`` must be one of ``known`` (attribute or index access and
    positional ``{}`` are refused: a template only substitutes text)."""
    for name in template_fields(template):
        if name not in known:
            shown = f"{{{name}}}" if name else "{}"
            for_example = f"; e.g. for image {example}" if example else ""
            raise PairingError(
                f"--mask-template {_q(template)} names an unknown field {shown}; known fields: "
                f"{', '.join('{' + k + '}' for k in known)}{for_example}"
            )


def mask_path(template: str, image_rel: str, fields: Mapping[str, str]) -> str:
    """The mask path of ``image_rel``: the filled template, relative to the image's folder,
    or to the masks' root with a leading ``/``. It may not leave the root."""
    filled = template.format_map(fields)
    if filled.startswith("/"):
        rel = posixpath.normpath(filled.lstrip("/"))
    else:
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(image_rel), filled))
    if rel == ".." or rel.startswith("../") or rel in (".", ""):
        raise PairingError(
            f"--mask-template {_q(template)} maps image {image_rel!r} to {rel!r}, outside the "
            "masks' root; name a folder inside it (a leading / starts at the root)"
        )
    return rel


def name_fields(rel: str, match: re.Match[str] | None = None) -> dict[str, str]:
    """The template fields of the image at ``rel``: its name parts and the pattern's groups."""
    name = posixpath.basename(rel)
    stem, ext = posixpath.splitext(name)
    fields = {"id": stem, "stem": stem, "name": name, "ext": ext}
    if match is not None:
        fields.update({k: v or "" for k, v in match.groupdict().items()})
    return fields


def pair_by_name(
    files: Sequence[FileInfo], spec: Pairing, masks_beside: bool, root: str = "the source"
) -> list[Candidate]:
    """Images among ``files`` and the paths of their masks. ``masks_beside``: masks are listed
    with the images, so a file that is some image's mask is not itself an image."""
    rx = compile_image_pattern(spec.image_pattern) if spec.image_pattern else None
    found: list[Candidate] = []
    for f in files:
        if posixpath.splitext(f.rel)[1].lower() not in IMAGE_SUFFIXES:
            continue
        if not fnmatch.fnmatch(f.rel, spec.image_glob):
            continue
        m = rx.fullmatch(f.rel) if rx is not None else None
        if rx is not None and m is None:
            continue
        fields = name_fields(f.rel, m)
        image_id = m["id"] if m is not None else posixpath.splitext(f.rel)[0]
        group = (m.groupdict().get("group") or "") if m is not None else ""
        mask = None
        if spec.mask_template is not None:
            if not found:  # once: the first image shows the fields in the message
                check_template(spec.mask_template, list(fields), _show_fields(f.rel, fields))
            mask = mask_path(spec.mask_template, f.rel, fields)
        found.append(Candidate(image_id, group, f, mask))
    if rx is not None and not found:
        raise PairingError(_matches_nothing(spec, rx, files, root))
    if masks_beside:
        claimed = {c.mask for c in found}
        found = [c for c in found if c.image.rel not in claimed]
    _one_image_per_mask(found, spec.mask_template)
    return found


def _show_fields(rel: str, fields: Mapping[str, str]) -> str:
    return f"{rel!r}: " + ", ".join(f"{k}={v!r}" for k, v in fields.items())


def _matches_nothing(
    spec: Pairing, rx: re.Pattern[str], files: Sequence[FileInfo], root: str
) -> str:
    images = [f.rel for f in files if posixpath.splitext(f.rel)[1].lower() in IMAGE_SUFFIXES]
    seen = images or [f.rel for f in files]
    shown = ", ".join(repr(r) for r in seen[:_SHOWN]) or "no files"
    hint = ""
    by_name = next((r for r in seen if rx.fullmatch(posixpath.basename(r))), None)
    if by_name is not None:
        folder = posixpath.dirname(by_name)
        hint = (
            f"; it matches the file name of {by_name!r} but is matched against the whole path: "
            f"write {_q(re.escape(folder) + '/' + str(spec.image_pattern))}, or "
            f"{_q('(?:.*/)?' + str(spec.image_pattern))} for any folder"
        )
    elif spec.image_glob != "*":
        hint = f" (only files matching --image-glob {spec.image_glob!r} are tried)"
    return (
        f"--image-pattern {_q(str(spec.image_pattern))} matches none of the {len(files)} "
        f"files under {root}, e.g. {shown}{hint}"
    )


def _one_image_per_mask(found: Iterable[Candidate], template: str | None) -> None:
    """Two images of different ids naming one mask is a pairing that cannot be right (the
    pattern's id is too coarse, or the template drops the field that tells them apart).
    Two files of one id (``a.png``, ``a.jpg``) are left to the duplicate-id rule."""
    first: dict[str, Candidate] = {}
    for c in found:
        if c.mask is None:
            continue
        other = first.setdefault(c.mask, c)
        if other.id != c.id:
            raise PairingError(
                f"--mask-template {_q(str(template))} maps two images to one mask: "
                f"{other.image.rel!r} (id {other.id!r}) and {c.image.rel!r} (id {c.id!r}) -> "
                f"{c.mask!r}; put the "
                "field that tells them apart into the template (or the pattern's id group)"
            )


# -- pairs CSV ----------------------------------------------------------------------------------
def read_pairs(
    url: str,
    storage: StorageOptions | None,
    image_root: Store | None,
    image_files: Mapping[str, FileInfo] | None,
    mask_root: Store | None,
    mask_files: Mapping[str, FileInfo] | None,
) -> Paired:
    """The rows of the pairs CSV at ``url``. ``image_files`` / ``mask_files`` (rel -> listed
    file) check that each file exists (``None``: not checked); ``mask_root`` ``None``: the
    ``mask`` column is not needed (predict reads only images); ``image_root`` ``None``: no
    image is read, the image cell only names the row (evaluate reads only masks), so it may
    be anywhere and its candidate's ``image.rel`` is its URL."""
    folder, name = _split_csv_url(url)
    try:
        data = Store(folder, storage).read_bytes(name)
    except StorageError:
        raise PairingError(
            f"no pairs CSV at {url!r}; --pairs takes the URL of a CSV of image,mask rows"
        ) from None
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig", errors="replace"))))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    col = {h: i for i, h in reversed(list(enumerate(header)))}
    mask_col = next((col[h] for h in _MASK_COLUMNS if h in col), None)
    needed = ["image"] + (["mask"] if mask_root is not None else [])
    if "image" not in col or (mask_root is not None and mask_col is None):
        example = ",".join(rows[1]) if len(rows) > 1 else "(no rows)"
        raise PairingError(
            f"pairs CSV {url!r} has columns {header}; it needs {', '.join(needed)} (optional: "
            f"group, id), e.g. a header 'image,mask,group' and rows like "
            f"'images/01_test.tif,1st_manual/01_manual1.gif,patient1'; its first row: {example}"
        )
    if len(rows) < 2:
        raise PairingError(f"pairs CSV {url!r} has a header and no rows")
    out = Paired([])
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        cells = {h: (row[i].strip() if i < len(row) else "") for h, i in col.items()}
        where = f"line {line} of {url}"
        image_cell = cells["image"]
        mask_cell = row[mask_col].strip() if mask_col is not None and mask_col < len(row) else ""
        image_id = cells.get("id") or posixpath.splitext(posixpath.basename(image_cell))[0]
        if not image_cell:
            out.dropped.append(Dropped(url, "unreadable", f"{where} names no image", image_id))
            continue
        image_url = _resolve(image_cell, folder)
        problem = id_problem(image_id)
        if problem is not None:
            why = f"{where}: {problem}; give the row an id cell of letters, digits, - _ . and /"
            out.dropped.append(Dropped(image_url, "unreadable", why, image_id))
            continue
        if image_root is None:  # not read: the cell only names the row
            image_rel, image_uri = image_url, image_url
        else:
            rel = _rel_under(image_url, image_root)
            if rel is None:
                why = f"{where}: {image_cell!r} is outside the source {image_root.url}; " + _OUTSIDE
                out.dropped.append(Dropped(image_url, "unreadable", why, image_id))
                continue
            image_rel, image_uri = rel, image_root.uri(rel)
        image = image_files.get(image_rel) if image_files is not None else None
        if image_files is not None and image is None:
            why = f"{where}: no such file {image_uri}"
            out.dropped.append(Dropped(image_url, "unreadable", why, image_id))
            continue
        mask_rel = None
        if mask_root is not None and mask_cell:
            mask_url = _resolve(mask_cell, folder)
            mask_rel = _rel_under(mask_url, mask_root)
            if mask_rel is None:
                why = f"{where}: mask {mask_cell!r} is outside {mask_root.url}; " + _OUTSIDE
                out.dropped.append(Dropped(image_uri, "missing_mask", why, image_id))
                continue
            if mask_files is not None and mask_rel not in mask_files:
                why = f"{where}: the mask {mask_root.uri(mask_rel)} does not exist"
                out.dropped.append(Dropped(image_uri, "missing_mask", why, image_id))
                continue
        image = image or FileInfo(image_rel, 0, "")
        out.candidates.append(Candidate(image_id, cells.get("group", ""), image, mask_rel))
    return out


_OUTSIDE = (
    "files are read only from inside it: give a --source (--masks; evaluate: --truth) that "
    "holds them"
)


def _split_csv_url(url: str) -> tuple[str, str]:
    protocol, path = split_url(url)
    folder, name = posixpath.split(path)
    return (folder if protocol == "file" else f"{protocol}://{folder}"), name


def _resolve(cell: str, folder: str) -> str:
    """A CSV cell as a URL: absolute URLs and paths as they are, others from the CSV's folder."""
    if "://" in cell or os.path.isabs(cell):
        return cell
    return posixpath.join(folder, cell)


def _rel_under(url: str, root: Store) -> str | None:
    """``url`` relative to ``root``, or ``None`` when it is not strictly inside it."""
    try:
        protocol, path = split_url(url)
    except StorageError:
        return None
    if protocol != root.protocol:
        return None
    path, base = posixpath.normpath(path), posixpath.normpath(root.root)
    if not path.startswith(base.rstrip("/") + "/"):
        return None
    return path[len(base.rstrip("/")) + 1 :]


# -- the three commands -------------------------------------------------------------------------
def find_pairs(
    spec: Pairing,
    source: Store,
    files: Sequence[FileInfo],
    masks: Store | None,
    mask_files: Sequence[FileInfo] | None,
) -> Paired:
    """Images of ``source`` and the paths of their masks in ``masks`` (``None``: no masks are
    wanted), by the pairs CSV when ``spec.pairs`` is set, else by name."""
    if spec.pairs:
        by_rel = {f.rel: f for f in files}
        mask_by_rel = {f.rel: f for f in mask_files} if mask_files is not None else None
        return read_pairs(spec.pairs, source.options, source, by_rel, masks, mask_by_rel)
    beside = masks is None or masks.url == source.url
    out = Paired([])
    for c in pair_by_name(files, spec, masks_beside=beside, root=source.url):
        problem = id_problem(c.id)
        if problem is None:
            out.candidates.append(c)
        else:
            why = f"{problem}; --image-pattern {_q(str(spec.image_pattern))} gave it"
            out.dropped.append(Dropped(source.uri(c.image.rel), "unreadable", why, c.id))
    return out


def first_per_id(paired: Paired, root: Store | None, use: str) -> Paired:
    """The first image of each id in path order stays; the others are dropped as
    ``duplicate_id`` (as ingest and predict do): two files of one id would name one output,
    and which one won would depend on the listing. ``use`` says what happens to the kept one
    (``"scored"``, ``"cropped"``); ``root`` ``None``: ``image.rel`` is already a URL."""
    kept: dict[str, Candidate] = {}
    dropped = list(paired.dropped)
    for c in sorted(paired.candidates, key=lambda c: c.image.rel):
        first = kept.setdefault(c.id, c)
        if first is not c:
            file = root.uri(c.image.rel) if root is not None else c.image.rel
            why = f"{c.image.rel} has the id {c.id} of {first.image.rel}, which is {use}"
            dropped.append(Dropped(file, "duplicate_id", why, c.id))
    return Paired(list(kept.values()), dropped)


def pairing_option(spec: Pairing) -> str:
    """The option that chose the images, as a message names it."""
    if spec.pairs:
        return f"--pairs {spec.pairs}"
    if spec.image_pattern:
        return f"--image-pattern {_q(str(spec.image_pattern))}"
    return f"--image-glob {_q(spec.image_glob)}"


def select_images(source: Store, spec: Pairing, task: str) -> Paired:
    """The images of ``source`` that ``spec`` selects, without masks (``segflow predict`` and
    ``segflow crops`` read only images); selecting none at all is a :class:`PairingError`."""
    paired = find_pairs(spec, source, source.list(), None, None)
    if not paired.candidates:
        how = pairing_option(spec)
        why = f"; e.g. {paired.dropped[0].detail}" if paired.dropped else ""
        raise PairingError(f"no image to {task} under {source.url} from {how}{why}")
    return paired


def list_images(
    source_url: str,
    storage: StorageOptions | None,
    image_glob: str,
    image_pattern: str | None,
    pairs: str | None,
) -> tuple[list[tuple[str, str, str]], list[dict[str, str]]]:
    """What ``segflow predict --image-pattern/--pairs`` reads: ``(id, path relative to the
    source, fingerprint)`` per image, and the rows left out as ``{file, id, reason,
    detail}``."""
    spec = Pairing(image_glob, image_pattern, None, pairs)
    paired = select_images(Store(source_url, storage), spec, "predict")
    found = [(c.id, c.image.rel, c.image.fingerprint) for c in paired.candidates]
    dropped = [
        {"file": d.file, "id": d.id, "reason": d.reason, "detail": d.detail} for d in paired.dropped
    ]
    return found, dropped
