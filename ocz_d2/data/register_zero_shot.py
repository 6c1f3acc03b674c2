"""Registration of zero-shot semantic-segmentation splits in Detectron2's catalogs.

A zero-shot split is a folder of images, a folder of label PNGs with the same relative names
(class indices ``0..K-1`` in the dataset's native order, ``255`` = ignore), the list of ``K``
class names, and the list of classes that are *unseen* in training. Everything else (seen
indices, metadata, dataset dicts) is derived from these.

Example::

    from ocz_d2.data import register_zero_shot_split

    register_zero_shot_split(
        "my_dataset_train",                  # registered as "ocz_my_dataset_train"
        image_root="my_dataset/images/train",  # relative to $DETECTRON2_DATASETS
        label_root="my_dataset/labels/train",
        classes=["cat", "dog", "car", "tree"],
        unseen=["dog"],                      # or indices: [1]
    )
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ..constants import EVALUATOR_TYPE, IGNORE_LABEL
from ..utils.errors import DataError, MissingFileError, unreadable_file_message
from ..utils.io import DATASETS_ENV, datasets_root

__all__ = [
    "IGNORE_LABEL",
    "EVALUATOR_TYPE",
    "IMAGE_EXTENSIONS",
    "check_datasets",
    "datasets_root",
    "ignore_label_of",
    "resolve_dataset_path",
    "resolve_unseen",
    "load_class_embeddings",
    "register_zero_shot_split",
    "unregister_zero_shot_split",
    "is_zero_shot_split",
    "registered_file_extensions",
    "register_path_check",
    "unknown_dataset_message",
]

logger = logging.getLogger(__name__)

#: Extensions recognised as images when ``image_ext`` is left to auto-detection.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_NAME_PREFIX = "ocz_"
_PREPARE_HINT = (
    "Set the environment variable DETECTRON2_DATASETS to the folder that holds your datasets "
    "(now: {root}) or prepare the data first (see datasets/README.md; the synthetic benchmark "
    "is made by `python tools/prepare_synthetic.py`)."
)


def _prepare_hint() -> str:
    root = datasets_root()
    shown = f"{root!r}, i.e. {os.path.abspath(root)}" if root != os.path.abspath(root) else root
    unset = "" if DATASETS_ENV in os.environ else ", unset"
    return _PREPARE_HINT.format(root=shown + unset)


# Image headers are read in threads beyond this many files (helps on network file systems).
_PARALLEL_SIZE_THRESHOLD = 256


@dataclass(frozen=True)
class _SplitSpec:
    """Normalised registration arguments; two registrations are identical iff specs are equal."""

    name: str
    image_root: str
    label_root: str
    classes: tuple[str, ...]
    unseen: tuple[int, ...]
    class_embeddings: str | None
    image_ext: str | None
    label_ext: str
    extra_label_roots: tuple[tuple[str, str], ...]
    split_file: str | None


# Splits registered through this module, by registered name.
_REGISTERED: dict[str, _SplitSpec] = {}


def ignore_label_of(dataset_name: str | None) -> int:
    """The label value that a dataset's label maps use for pixels no loss or metric counts.

    Args:
        dataset_name: a registered dataset, or None (a sample without a dataset).

    Returns:
        The ``ignore_label`` of the dataset's metadata; :data:`IGNORE_LABEL` when the dataset is
        None or its metadata has none.
    """
    if dataset_name is None or dataset_name not in MetadataCatalog.list():
        return IGNORE_LABEL
    return int(MetadataCatalog.get(dataset_name).get("ignore_label", IGNORE_LABEL))


def resolve_dataset_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """Resolve a dataset path to an absolute path.

    Args:
        path: absolute path, or a path relative to ``root``; ``~`` is expanded.
        root: base folder of relative paths; ``None`` uses :func:`datasets_root`.

    Returns:
        The absolute, normalised path (the file need not exist).
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_absolute():
        base = Path(os.path.expanduser(os.fspath(root if root is not None else datasets_root())))
        path = base / path
    return os.path.abspath(path)


def _prefixed(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise DataError(f"A zero-shot split needs a non-empty string name, got {name!r}.")
    return name if name.startswith(_NAME_PREFIX) else _NAME_PREFIX + name


def _check_classes(name: str, classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) == 0:
        raise DataError(
            f"{name}: `classes` must be a non-empty list of class names in the label order, "
            f"got {classes!r}."
        )
    bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DataError(f"{name}: every class name must be a non-empty string; got {bad[:5]!r}.")
    seen: dict[str, int] = {}
    duplicates = []
    for i, c in enumerate(classes):
        if c in seen:
            duplicates.append(f"{c!r} at indices {seen[c]} and {i}")
        seen.setdefault(c, i)
    if duplicates:
        raise DataError(
            f"{name}: duplicate class names: {'; '.join(duplicates[:5])}. Class names must be "
            "unique (they are matched to text embeddings); rename one of each pair."
        )
    if len(classes) >= IGNORE_LABEL:
        raise DataError(
            f"{name}: {len(classes)} classes do not fit uint8 label maps with ignore = "
            f"{IGNORE_LABEL}; at most {IGNORE_LABEL} classes are supported."
        )
    return tuple(classes)


def resolve_unseen(
    classes: Sequence[str], unseen: Sequence[str | int], *, name: str = "split"
) -> list[int]:
    """Turn an unseen-class list (names or indices) into sorted class indices.

    Args:
        classes: the ``K`` class names in label order.
        unseen: class names or integer indices into ``classes`` (not mixed with duplicates).
        name: split name used in error messages.

    Returns:
        Sorted list of unseen class indices.

    Raises:
        ValueError: on an unknown name (close matches are suggested), an index outside
            ``[0, K)``, or a class listed twice.
    """
    if isinstance(unseen, str | bytes) or not isinstance(unseen, Sequence):
        raise DataError(
            f"{name}: `unseen` must be a list of class names or indices, got {unseen!r}."
        )
    index = {c: i for i, c in enumerate(classes)}
    out: list[int] = []
    for item in unseen:
        if isinstance(item, bool):
            raise DataError(f"{name}: unseen entry {item!r} is a bool, not a name or index.")
        if isinstance(item, int | np.integer):
            if not 0 <= int(item) < len(classes):
                raise DataError(
                    f"{name}: unseen index {int(item)} is out of range: there are "
                    f"{len(classes)} classes, so valid indices are 0..{len(classes) - 1}."
                )
            out.append(int(item))
        elif isinstance(item, str):
            if item not in index:
                close = difflib.get_close_matches(item, list(classes), n=3, cutoff=0.6)
                hint = f" Did you mean {close}?" if close else ""
                shown = list(classes[:20]) + (["..."] if len(classes) > 20 else [])
                raise DataError(
                    f"{name}: unseen class {item!r} is not one of the {len(classes)} class "
                    f"names.{hint} Valid names: {shown}."
                )
            out.append(index[item])
        else:
            raise DataError(
                f"{name}: unseen entry {item!r} must be a class name (str) or index (int)."
            )
    repeated = sorted({classes[i] for i in out if out.count(i) > 1})
    if repeated:
        raise DataError(f"{name}: unseen lists these classes more than once: {repeated}.")
    return sorted(out)


def load_class_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Load a class-embedding file (``.npz`` with ``classes`` [K] and ``embeddings`` [K, D]).

    Args:
        path: the ``.npz`` file.

    Returns:
        ``(classes, embeddings)``: the class names and a float32 array of shape [K, D].

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if a key is missing or the shapes disagree.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(
            f"Class-embedding file {path} does not exist. Create it (a .npz with 'classes' [K] "
            "and 'embeddings' [K, D]) or drop `class_embeddings` to use the text encoder."
        )
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("classes", "embeddings") if k not in data.files]
        if missing:
            raise DataError(
                f"Class-embedding file {path} lacks the key(s) {missing}; it has {data.files}. "
                "It needs 'classes' (unicode array [K]) and 'embeddings' (float array [K, D])."
            )
        classes = [str(c) for c in data["classes"].tolist()]
        emb = np.asarray(data["embeddings"])
    if emb.ndim != 2 or emb.shape[0] != len(classes):
        raise DataError(
            f"Class-embedding file {path}: 'embeddings' has shape {emb.shape}, expected "
            f"[{len(classes)}, D] (one row per entry of 'classes')."
        )
    if not np.issubdtype(emb.dtype, np.floating) or not np.all(np.isfinite(emb)):
        raise DataError(f"Class-embedding file {path}: 'embeddings' must be finite floats.")
    return classes, emb.astype(np.float32, copy=False)


def _check_class_embeddings(name: str, path: str, classes: Sequence[str]) -> None:
    file_classes, emb = load_class_embeddings(path)
    if list(file_classes) == list(classes):
        norms = np.linalg.norm(emb, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-3):
            logger.warning(
                "%s: rows of %s are not L2-normalised (norms %.3f..%.3f); consumers normalise "
                "them, but the file format asks for unit rows.",
                name,
                path,
                norms.min(),
                norms.max(),
            )
        return
    missing = [c for c in classes if c not in file_classes]
    extra = [c for c in file_classes if c not in classes]
    if missing or extra:
        detail = f"names missing from the file: {missing[:10]}; only in the file: {extra[:10]}"
    elif len(file_classes) != len(classes):
        detail = f"the file has {len(file_classes)} rows with repeated names"
    else:
        first = next(i for i, (a, b) in enumerate(zip(file_classes, classes)) if a != b)
        detail = (
            f"the same names in a different order (first difference at index {first}: "
            f"file {file_classes[first]!r}, split {classes[first]!r})"
        )
    raise DataError(
        f"{name}: the classes of the class-embedding file {path} do not equal the split's "
        f"{len(classes)} classes ({detail}). Rows must follow the split's class order; "
        "regenerate the file for this class list."
    )


def _list_files(root: str, exts: Sequence[str] | None) -> dict[str, str]:
    """Map each file's relative path without extension to its relative path (sorted walk)."""
    found: dict[str, str] = {}
    duplicates: list[str] = []
    lowered = tuple(e.lower() for e in exts) if exts is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            stem, ext = os.path.splitext(fname)
            if lowered is not None and ext.lower() not in lowered:
                continue
            rel = os.path.relpath(os.path.join(dirpath, fname), root)
            key = os.path.join(os.path.dirname(rel), stem) if os.path.dirname(rel) else stem
            if key in found:
                duplicates.append(f"{found[key]} / {rel}")
            found[key] = rel
    if duplicates:
        raise DataError(
            f"Files in {root} share a name with different extensions: {duplicates[:5]}. "
            "Pass `image_ext` to choose one extension."
        )
    return found


def _image_size(path: str) -> tuple[int, int]:
    """Return (height, width) as read_image will see it, reading only the file header."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            # read_image applies the EXIF orientation; orientations 5-8 swap the axes. PNG
            # headers carry no EXIF (reading it would decode the file): check these formats only.
            if img.format in ("JPEG", "MPO", "TIFF", "WEBP"):
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    width, height = height, width
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(unreadable_file_message(f"Cannot read the image {path}", path, e)) from e
    return height, width


def _missing_root_error(name: str, kind: str, path: str) -> MissingFileError:
    return MissingFileError(f"{name}: the {kind} folder {path} does not exist. " + _prepare_hint())


def _check_pairs(
    name: str, kind: str, root: str, found: Mapping[str, str], label_root: str, labels: Mapping
) -> None:
    no_label = sorted(set(found) - set(labels))
    if no_label:
        examples = [found[k] for k in no_label[:5]]
        raise DataError(
            f"{name}: {len(no_label)} of {len(found)} {kind}s in {root} have no label in "
            f"{label_root} (e.g. {examples}). Every {kind} needs a label PNG with the same "
            "relative name; remove the extra files or point the roots at matching folders."
        )


def _check_spec_paths(spec: _SplitSpec) -> None:
    """Raise if a folder or the class-embedding file of the split is missing (no listing)."""
    for kind, root in [("image", spec.image_root), ("label", spec.label_root)] + [
        (f"{key} label", r) for key, r in spec.extra_label_roots
    ]:
        if not os.path.isdir(root):
            raise _missing_root_error(spec.name, kind, root)
    if spec.class_embeddings is not None and not os.path.isfile(spec.class_embeddings):
        raise MissingFileError(
            f"{spec.name}: the class-embedding file {spec.class_embeddings} does not exist. "
            + _prepare_hint()
        )


def _load_dicts(spec: _SplitSpec) -> list[dict]:
    """Check the split's files and build its dataset dicts (the DatasetCatalog loader)."""
    name = spec.name
    _check_spec_paths(spec)
    if spec.class_embeddings is not None:
        _check_class_embeddings(name, spec.class_embeddings, spec.classes)

    image_exts = [spec.image_ext] if spec.image_ext else list(IMAGE_EXTENSIONS)
    images = _list_files(spec.image_root, image_exts)
    if not images:
        present = sorted({os.path.splitext(f)[1] for f in os.listdir(spec.image_root)})
        raise DataError(
            f"{name}: no image with extension {image_exts} in {spec.image_root} (extensions "
            f"found there: {present}). Set `image_ext` or fix `image_root`."
        )
    labels = _list_files(spec.label_root, [spec.label_ext])
    _check_pairs(name, "image", spec.image_root, images, spec.label_root, labels)
    no_image = sorted(set(labels) - set(images))
    if no_image:
        examples = [labels[k] for k in no_image[:5]]
        raise DataError(
            f"{name}: {len(no_image)} of {len(labels)} labels in {spec.label_root} have no "
            f"image in {spec.image_root} (e.g. {examples}; image extensions looked for: "
            f"{image_exts}). Remove the stray labels, set `image_ext`, or fix the roots."
        )
    extras = {}
    for key, root in spec.extra_label_roots:
        files = _list_files(root, [spec.label_ext])
        _check_pairs(name, "image", spec.image_root, images, root, files)
        extras[key] = files

    keys = sorted(images)
    paths = [os.path.join(spec.image_root, images[k]) for k in keys]
    if len(paths) > _PARALLEL_SIZE_THRESHOLD:
        with ThreadPoolExecutor(max_workers=8) as pool:
            sizes = list(pool.map(_image_size, paths))
    else:
        sizes = [_image_size(p) for p in paths]

    dicts = []
    for key, path, (height, width) in zip(keys, paths, sizes):
        record = {
            "file_name": path,
            "sem_seg_file_name": os.path.join(spec.label_root, labels[key]),
            "height": height,
            "width": width,
            "image_id": key,
            "dataset_name": name,
        }
        for extra_key, root in spec.extra_label_roots:
            record[f"{extra_key}_file_name"] = os.path.join(root, extras[extra_key][key])
        dicts.append(record)
    logger.info("Loaded %d images of %s from %s", len(dicts), name, spec.image_root)
    return dicts


def _describe_difference(old: _SplitSpec, new: _SplitSpec) -> str:
    diffs = []
    for field in old.__dataclass_fields__:
        a, b = getattr(old, field), getattr(new, field)
        if a != b:
            diffs.append(f"{field}: registered {a!r}, now {b!r}")
    return "; ".join(diffs)


def _normalise_extension(ext: str | None, what: str) -> str | None:
    if ext is None:
        return None
    if not isinstance(ext, str) or not ext:
        raise DataError(f"`{what}` must be an extension such as '.png', got {ext!r}.")
    return ext if ext.startswith(".") else "." + ext


def register_zero_shot_split(
    name: str,
    *,
    image_root: str | os.PathLike,
    label_root: str | os.PathLike,
    classes: Sequence[str],
    unseen: Sequence[str | int],
    class_embeddings: str | os.PathLike | None = None,
    image_ext: str | None = None,
    label_ext: str = ".png",
    extra_label_roots: Mapping[str, str | os.PathLike] | None = None,
    split_file: str | os.PathLike | None = None,
    lazy: bool = False,
    root: str | os.PathLike | None = None,
) -> str:
    """Register one zero-shot split in ``DatasetCatalog`` and ``MetadataCatalog``.

    Args:
        name: dataset name; the prefix ``"ocz_"`` is added if missing.
        image_root: folder of images (searched recursively); relative paths resolve against
            ``root`` or ``$DETECTRON2_DATASETS`` (default ``"datasets"``).
        label_root: folder of label PNGs with the images' relative names: uint8 class indices
            ``0..K-1`` in the order of ``classes``, 255 = ignore.
        classes: the ``K`` class names in label order (unique).
        unseen: unseen classes as names or indices into ``classes``; may be empty (e.g. a
            cross-domain test set).
        class_embeddings: optional ``.npz`` file with ``classes`` [K] (equal to ``classes``) and
            ``embeddings`` [K, D] (rows L2-normalised).
        image_ext: image extension (e.g. ``".jpg"``); ``None`` accepts any of
            :data:`IMAGE_EXTENSIONS` as long as no two images share a name.
        label_ext: label extension.
        extra_label_roots: extra per-image label maps, ``{key: folder}``; the dataset dicts get
            ``"<key>_file_name"`` (e.g. ``{"object_map": ...}`` gives ``object_map_file_name``).
        split_file: the YAML split file this registration comes from (recorded in the metadata).
        lazy: defer the file-system checks (folders, image/label pairing, embedding file) to the
            first ``DatasetCatalog.get(name)``, for splits whose data may not exist yet.
        root: base of relative paths instead of ``$DETECTRON2_DATASETS``.

    Returns:
        The registered name. Registering the same name again with identical arguments is a
        no-op; with different arguments it raises ``ValueError``.

    Metadata set: ``stuff_classes``, ``seen_classes``, ``unseen_classes`` (sorted indices),
    ``ignore_label`` (255), ``evaluator_type`` (``"ocz_zero_shot_sem_seg"``), ``image_root``,
    ``sem_seg_root``, ``class_embeddings`` and ``split_file`` (absolute paths or ``None``).
    """
    spec = _make_spec(
        _prefixed(name),
        image_root=image_root,
        label_root=label_root,
        classes=classes,
        unseen=unseen,
        class_embeddings=class_embeddings,
        image_ext=image_ext,
        label_ext=label_ext,
        extra_label_roots=extra_label_roots,
        split_file=split_file,
        root=root,
    )
    if _already_registered(spec):
        return spec.name
    if not lazy:
        _load_dicts(spec)  # fail now, with the same checks the loader runs
    DatasetCatalog.register(spec.name, lambda spec=spec: _load_dicts(spec))
    _set_metadata(spec)
    _REGISTERED[spec.name] = spec
    logger.debug(
        "Registered %s: %d classes (%d unseen)%s",
        spec.name,
        len(spec.classes),
        len(spec.unseen),
        " (lazy)" if lazy else "",
    )
    return spec.name


def _make_spec(name: str, *, classes, unseen, extra_label_roots, root, **paths) -> _SplitSpec:
    """Check and normalise the arguments of :func:`register_zero_shot_split` (``name`` already
    prefixed; ``paths``: image_root, label_root, class_embeddings, image_ext, label_ext,
    split_file)."""
    classes = _check_classes(name, classes)
    extra = {}
    for key, folder in dict(extra_label_roots or {}).items():
        if not isinstance(key, str) or not key.isidentifier() or key in ("file", "sem_seg"):
            raise DataError(
                f"{name}: extra label key {key!r} must be an identifier other than 'file' and "
                "'sem_seg' (it becomes the dataset-dict key '<key>_file_name')."
            )
        extra[key] = resolve_dataset_path(folder, root)
    embeddings, split_file = paths["class_embeddings"], paths["split_file"]
    return _SplitSpec(
        name=name,
        image_root=resolve_dataset_path(paths["image_root"], root),
        label_root=resolve_dataset_path(paths["label_root"], root),
        classes=classes,
        unseen=tuple(resolve_unseen(classes, unseen, name=name)),
        class_embeddings=resolve_dataset_path(embeddings, root) if embeddings is not None else None,
        image_ext=_normalise_extension(paths["image_ext"], "image_ext"),
        label_ext=_normalise_extension(paths["label_ext"], "label_ext"),
        extra_label_roots=tuple(sorted(extra.items())),
        split_file=os.path.abspath(os.fspath(split_file)) if split_file is not None else None,
    )


def _already_registered(spec: _SplitSpec) -> bool:
    """True if this very split is registered; raises if its name is taken otherwise."""
    if spec.name in _REGISTERED:
        if _REGISTERED[spec.name] == spec:
            return True
        raise DataError(
            f"Dataset {spec.name!r} is already registered with different arguments "
            f"({_describe_difference(_REGISTERED[spec.name], spec)}). Use another name, or call "
            "ocz_d2.data.unregister_zero_shot_split(name) first."
        )
    if spec.name in DatasetCatalog.list():
        raise DataError(
            f"Dataset {spec.name!r} is already registered in DatasetCatalog by other code; "
            "choose another name for the zero-shot split."
        )
    return False


def _set_metadata(spec: _SplitSpec) -> None:
    """The split's metadata: everything derived from its classes and unseen list."""
    MetadataCatalog.get(spec.name).set(
        stuff_classes=list(spec.classes),
        seen_classes=[i for i in range(len(spec.classes)) if i not in spec.unseen],
        unseen_classes=list(spec.unseen),
        ignore_label=IGNORE_LABEL,
        evaluator_type=EVALUATOR_TYPE,
        image_root=spec.image_root,
        sem_seg_root=spec.label_root,
        class_embeddings=spec.class_embeddings,
        split_file=spec.split_file,
        extra_label_roots=dict(spec.extra_label_roots),
    )


def unregister_zero_shot_split(name: str) -> None:
    """Remove a split registered by :func:`register_zero_shot_split` from both catalogs.

    Args:
        name: the registered name (with or without the ``"ocz_"`` prefix).

    Raises:
        KeyError: if no zero-shot split of that name is registered.
    """
    name = _prefixed(name)
    if name not in _REGISTERED:
        raise KeyError(f"No zero-shot split named {name!r} is registered.")
    del _REGISTERED[name]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def unknown_dataset_message(name: str, key: str = "DATASETS.TRAIN") -> str:
    """The error for a dataset name that nothing registered: the close names among the
    zero-shot splits, and how to register one."""
    close = difflib.get_close_matches(name, sorted(_REGISTERED), n=3, cutoff=0.6)
    if close:
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?"
    else:
        names = sorted(_REGISTERED)
        shown = ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
        hint = f" The registered zero-shot splits are: {shown}."
    return (
        f"{key}: dataset {name!r} is not registered.{hint} To add a zero-shot split, list its "
        "YAML split file in DATASETS.SPLIT_FILES (format: ocz_d2/data/split_file.py, "
        "datasets/README.md) or call ocz_d2.data.register_zero_shot_split."
    )


def check_datasets(names: Sequence[str], key: str = "DATASETS.TRAIN") -> None:
    """Check, before any model is built, that datasets are registered and that the folders
    and class-embedding file of each zero-shot split exist (no file is listed or read).

    Args:
        names: registered dataset names (e.g. ``cfg.DATASETS.TRAIN``).
        key: the config key they come from, for the message.

    Raises:
        DataError: a name that nothing registered (close zero-shot split names are suggested).
        MissingFileError: a missing folder or class-embedding file; the message names it and
            ``$DETECTRON2_DATASETS``.
    """
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise DataError(unknown_dataset_message(name, key))
        if name in _REGISTERED:
            _check_spec_paths(_REGISTERED[name])
        if name in _PATH_CHECKS:
            _PATH_CHECKS[name]()


#: Other registered datasets' file checks for :func:`check_datasets` (e.g. caption splits).
_PATH_CHECKS: dict[str, Callable[[], None]] = {}


def register_path_check(name: str, check: Callable[[], None] | None) -> None:
    """Let :func:`check_datasets` run ``check()`` (raising a user error) for the dataset
    ``name`` registered elsewhere (e.g. :mod:`ocz_d2.data.captions`); None removes it."""
    if check is None:
        _PATH_CHECKS.pop(name, None)
    else:
        _PATH_CHECKS[name] = check


def is_zero_shot_split(name: str) -> bool:
    """Return whether ``name`` was registered by :func:`register_zero_shot_split`."""
    return name in _REGISTERED


def registered_file_extensions(name: str) -> tuple[str | None, str] | None:
    """``(image_ext, label_ext)`` that the split ``name`` was registered with by
    :func:`register_zero_shot_split` (``image_ext`` None: detected from the files), or None when
    it registered no split of that name."""
    spec = _REGISTERED.get(name)
    return None if spec is None else (spec.image_ext, spec.label_ext)
