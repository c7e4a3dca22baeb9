"""Build webdataset image–text corpora with injected, known misalignment.

No captioned image–text data is available offline, so a corpus is made from labelled images:
each image gets the caption "<template> <class name>", and a chosen fraction of the *train*
split gets a wrong caption. Because we inject the noise ourselves, ``truth.parquet`` records
exactly which pairs are misaligned — the ground truth that detection benchmarks score against.

Layout of ``OUT``::

    pretrain/pretrain-000000.tar ...   clean pairs to pre-train a small CLIP on
    train/train-000000.tar ...         the audited corpus (the only split with noise)
    val/val-000000.tar ...             clean, trusted validation pairs (the IS query set)
    test/test-000000.tar ...           held-out images from the dataset's test split, correct captions
    truth.parquet                      one row per sample of every split
    classes.json                       {"dataset", "classes", "templates"} for zero-shot prompts
    corpus.json                        the spec, resolved sizes and counts (written last)

Every sample has ``__key__`` (e.g. ``train0000123``; no dots, unique across splits), ``png``
(grayscale, mode L), ``txt`` (UTF-8 caption) and ``json`` (labels, caption class, template,
misalignment flag, index into the source dataset).

Everything is a pure function of the spec: the same seed gives byte-identical shards and truth.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm
from webdataset import TarWriter

from ecif_ray import __version__
from ecif_ray.data.datasets import DATASETS, LabelledImages, load_dataset
from ecif_ray.data.prompts import CAPTION_TEMPLATES, caption_for

__all__ = [
    "DEFAULT_SIZES",
    "NOISE_KINDS",
    "RANDOM_NOISE_KINDS",
    "SPLITS",
    "CorpusSpec",
    "CorpusSummary",
    "build_corpus",
    "misaligned_count",
    "sample_key",
    "shard_name",
]

RANDOM_NOISE_KINDS: tuple[str, ...] = ("swap-class", "swap-pair")  # noise a model does not learn
NOISE_KINDS: tuple[str, ...] = (*RANDOM_NOISE_KINDS, "substitute")  # + systematic noise it does learn
SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")

# Defaults leave room in each dataset's pool (digits: 600 + 600 + 200 + 397 = all 1,797 images).
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "fashion-mnist": {"pretrain": 20000, "train": 10000, "val": 1000, "test": 2000},
    "digits": {"pretrain": 600, "train": 600, "val": 200, "test": 397},
    "mnist": {"pretrain": 1500, "train": 2000, "val": 500, "test": 1000},
}

TRUTH_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("split", pa.string()),
        ("misaligned", pa.bool_()),
        ("true_class", pa.string()),
        ("caption_class", pa.string()),
        ("label", pa.int64()),
        ("caption_label", pa.int64()),
        ("template", pa.int64()),
        ("source_index", pa.int64()),
        ("caption", pa.string()),
    ]
)

# Fixed member mtime so equal specs give byte-identical shards; an int, because a float mtime
# makes tarfile add a PAX header to every member (tripling a small sample's size).
_TAR_MTIME = 0


# Systematic noise for kind "substitute" (the demo and the benchmarks): each source class partly captioned
# as a neighbouring class it is confused with, the errors a shop's alt-text makes.
CONFUSABLE_SUBSTITUTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "fashion-mnist": (("shirt", "t-shirt/top"), ("pullover", "coat"), ("sneaker", "sandal")),
    "digits": (("three", "eight"), ("seven", "one"), ("four", "nine")),
}


@dataclass(frozen=True)
class CorpusSpec:
    """What to build. Sizes left as ``None`` take the dataset's default (:data:`DEFAULT_SIZES`).

    ``noise`` is the fraction of the train split whose caption is made wrong; ``noise_kind``
    says how (see :data:`NOISE_KINDS`). ``substitute`` is systematic noise a model learns: for
    each ``(source, target)`` class pair of ``substitutions``, a ``noise`` fraction of the
    source class's train pairs are captioned as the target (a shop's alt-text naming the
    neighbouring product); the random kinds ignore ``substitutions``. ``overwrite`` allows
    replacing an earlier corpus in ``out``; without it an existing corpus is refused rather than
    silently mixed with new shards.
    """

    dataset: str
    out: str | Path
    noise: float = 0.0
    noise_kind: str = "swap-class"
    shard_size: int = 1000
    seed: int = 0
    pretrain_size: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    overwrite: bool = False
    substitutions: tuple[tuple[str, str], ...] = ()  # (source class, target class) names, for "substitute"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if not (isinstance(self.noise, int | float) and 0.0 <= self.noise < 1.0):
            raise ValueError(f"noise: must be a fraction in [0, 1), got {self.noise!r}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind: unknown {self.noise_kind!r}; choose one of {', '.join(NOISE_KINDS)}")
        if (self.noise_kind == "substitute") != bool(self.substitutions):
            raise ValueError("substitutions: give SRC=DST class pairs exactly when noise_kind is 'substitute'")
        for source, target in self.substitutions:
            if source == target:
                raise ValueError(f"substitutions: {source}={target} substitutes a class by itself")
        if len({source for source, _ in self.substitutions}) != len(self.substitutions):
            raise ValueError("substitutions: each source class may be substituted once")
        if not (isinstance(self.shard_size, int) and self.shard_size >= 1):
            raise ValueError(f"shard_size: must be a positive integer, got {self.shard_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}")
        for split in SPLITS:
            size = getattr(self, f"{split}_size")
            if size is not None and not (isinstance(size, int) and size >= 0):
                raise ValueError(f"{split}_size: must be a non-negative integer or None, got {size!r}")

    def sizes(self) -> dict[str, int]:
        """Requested samples per split, defaults filled in."""
        defaults = DEFAULT_SIZES[self.dataset]
        return {s: defaults[s] if getattr(self, f"{s}_size") is None else getattr(self, f"{s}_size") for s in SPLITS}

    def to_json(self) -> dict:
        return {**asdict(self), "out": str(self.out), "substitutions": [list(p) for p in self.substitutions]}


@dataclass
class CorpusSummary:
    """Where a built corpus lives and what is in it."""

    out: Path
    dataset: str
    shards: dict[str, list[Path]]  # split -> shard paths, in order
    counts: dict[str, int]  # split -> samples
    misaligned: int  # train pairs with a wrong caption
    truth: Path
    classes: Path
    manifest: Path
    seconds: float = 0.0
    num_classes: int = 0
    noise_kind: str = "swap-class"

    @property
    def shard_counts(self) -> dict[str, int]:
        return {split: len(paths) for split, paths in self.shards.items()}

    def describe(self) -> str:
        """A few human-readable lines for a CLI to print."""
        lines = [f"{self.dataset} corpus in {self.out} ({self.num_classes} classes, {self.seconds:.1f} s)"]
        for split in SPLITS:
            lines.append(f"  {split:8s} {self.counts[split]:7d} samples in {len(self.shards[split]):4d} shards")
        train = self.counts["train"]
        frac = self.misaligned / train if train else 0.0
        lines.append(f"  misaligned train pairs: {self.misaligned} ({frac:.1%}, {self.noise_kind})")
        lines.append(f"  ground truth: {self.truth}")
        return "\n".join(lines)


def misaligned_count(noise: float, train_size: int) -> int:
    """Number of train pairs that get a wrong caption: Python's ``round(noise * train_size)``."""
    return round(noise * train_size)


def sample_key(split: str, index: int) -> str:
    """Webdataset key of sample ``index`` of ``split``: no dots, unique across splits."""
    return f"{split}{index:07d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def build_corpus(spec: CorpusSpec, progress: bool = True) -> CorpusSummary:
    """Build the corpus described by ``spec`` and return where everything went."""
    start = time.perf_counter()
    data = load_dataset(spec.dataset)
    sizes = spec.sizes()
    rng_split, rng_template, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(3))

    picks = _split_indices(data, sizes, rng_split)
    captions = {s: _clean_captions(data.labels[picks[s]], rng_template) for s in SPLITS}
    _inject_noise(spec, data.labels[picks["train"]], captions["train"], data.class_names, rng_noise)

    out = Path(spec.out)
    _prepare_out(out, spec.overwrite)
    shards: dict[str, list[Path]] = {}
    truth: list[pa.Table] = []
    with tqdm(total=sum(sizes.values()), desc="corpus", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            shards[split], table = _write_split(out, split, data, picks[split], captions[split], spec.shard_size, bar)
            truth.append(table)

    truth_table = pa.concat_tables(truth)
    misaligned = int(np.sum(captions["train"][0] != data.labels[picks["train"]]))
    summary = CorpusSummary(
        out=out,
        dataset=spec.dataset,
        shards=shards,
        counts={s: len(picks[s]) for s in SPLITS},
        misaligned=misaligned,
        truth=out / "truth.parquet",
        classes=out / "classes.json",
        manifest=out / "corpus.json",
        num_classes=len(data.class_names),
        noise_kind=spec.noise_kind,
    )
    pq.write_table(truth_table, summary.truth)
    _write_json(
        summary.classes,
        {"dataset": spec.dataset, "classes": list(data.class_names), "templates": list(CAPTION_TEMPLATES)},
    )
    _write_json(summary.manifest, _manifest(spec, data, summary))  # last: marks the corpus complete
    summary.seconds = time.perf_counter() - start
    return summary


# --- splits -------------------------------------------------------------------------------------


def _split_indices(data: LabelledImages, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint random source indices per split.

    pretrain/train/val come from the dataset's own train split and test from its test split;
    datasets without an official split (digits, mnist) share one pool carved four ways.
    """
    train_pool = np.flatnonzero(data.source_split == "train")
    test_pool = np.flatnonzero(data.source_split == "test")
    fit_sizes = "pretrain + train + val" if test_pool.size else "pretrain + train + val + test"
    fit = sizes["pretrain"] + sizes["train"] + sizes["val"] + (0 if test_pool.size else sizes["test"])
    if fit > train_pool.size or (test_pool.size and sizes["test"] > test_pool.size):
        pools = f"{train_pool.size} train + {test_pool.size} test images" if test_pool.size else f"{len(data)} images"
        raise ValueError(
            f"requested sizes {sizes} do not fit {data.name}, which has {pools} "
            f"({fit_sizes} = {fit} must be <= {train_pool.size}"
            + (f", test must be <= {test_pool.size})" if test_pool.size else ")")
        )
    order = rng.permutation(train_pool)
    bounds = np.cumsum([0, sizes["pretrain"], sizes["train"], sizes["val"], sizes["test"]])
    picks = {s: order[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    if test_pool.size:
        picks["test"] = rng.permutation(test_pool)[: sizes["test"]]
    return picks


# --- captions and noise -------------------------------------------------------------------------


def _clean_captions(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(caption_label, template) per sample: the true class, a random template."""
    return labels.copy(), rng.integers(0, len(CAPTION_TEMPLATES), size=labels.shape[0])


def _inject_noise(
    spec: CorpusSpec,
    labels: np.ndarray,
    captions: tuple[np.ndarray, np.ndarray],
    class_names: tuple[str, ...],
    rng: np.random.Generator,
) -> None:
    """Make train captions wrong, in place: exactly ``misaligned_count(noise, train_size)`` of them for the
    random kinds, ``misaligned_count(noise, n_source)`` per source class for ``substitute``."""
    if spec.noise_kind == "substitute":
        _substitute(labels, captions, class_pairs(spec, class_names), spec.noise, rng)
        return
    num_classes = len(class_names)
    n = misaligned_count(spec.noise, labels.shape[0])
    if n == 0:
        return
    if num_classes < 2:
        raise ValueError(f"noise needs at least two classes; {spec.dataset} has {num_classes}")
    if spec.noise_kind == "swap-class":
        _swap_class(rng.choice(labels.shape[0], size=n, replace=False), captions, num_classes, rng)
    else:
        _swap_pair(labels, n, captions, num_classes, rng)


def class_pairs(spec: CorpusSpec, class_names: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
    """The substitutions as (source, target) label indices; unknown names are refused, listing the classes."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [name for pair in spec.substitutions for name in pair if name not in index]
    if unknown:
        raise ValueError(f"substitutions: unknown class {unknown[0]!r} for {spec.dataset}; classes: "
                         + ", ".join(class_names))
    return [(index[source], index[target]) for source, target in spec.substitutions]


def _substitute(labels: np.ndarray, captions: tuple[np.ndarray, np.ndarray], pairs: list[tuple[int, int]],
                fraction: float, rng: np.random.Generator) -> None:
    """For each (source, target): caption ``round(fraction · n_source)`` random source-class pairs as
    the target class (random template), in place."""
    caption_label, template = captions
    for source, target in pairs:
        members = np.flatnonzero(labels == source)
        chosen = rng.choice(members, size=misaligned_count(fraction, members.size), replace=False)
        caption_label[chosen] = target
        template[chosen] = rng.integers(0, len(CAPTION_TEMPLATES), size=chosen.size)


def _swap_class(
    chosen: np.ndarray, captions: tuple[np.ndarray, np.ndarray], num_classes: int, rng: np.random.Generator
) -> None:
    """Give each chosen pair the caption of a uniformly random other class, random template."""
    caption_label, template = captions
    caption_label[chosen] = (caption_label[chosen] + rng.integers(1, num_classes, size=chosen.size)) % num_classes
    template[chosen] = rng.integers(0, len(CAPTION_TEMPLATES), size=chosen.size)


def _swap_pair(
    labels: np.ndarray, n: int, captions: tuple[np.ndarray, np.ndarray], num_classes: int, rng: np.random.Generator
) -> None:
    """Exchange captions within n // 2 random pairs of different true classes.

    An odd ``n`` cannot be covered by exchanges alone; the one left over gets a swap-class
    caption instead, so the number of misaligned pairs is always exactly ``n``.
    """
    k = n // 2
    chosen = _capped_sample(labels, k, rng)
    first, second = _mixed_class_matching(labels, chosen, rng)
    caption_label, template = captions
    for arr in (caption_label, template):
        arr[first], arr[second] = arr[second].copy(), arr[first].copy()
    if n % 2:
        rest = np.setdiff1d(np.arange(labels.shape[0]), chosen)
        _swap_class(rng.choice(rest, size=1), captions, num_classes, rng)


def _capped_sample(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """2k random positions with no class holding more than k of them (so a mixed matching exists).

    Walks a random permutation and skips a class once it has k members; on balanced data the
    cap never binds and this is a plain uniform sample.
    """
    taken = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    chosen: list[int] = []
    for pos in rng.permutation(labels.shape[0]):
        if taken[labels[pos]] < k:
            taken[labels[pos]] += 1
            chosen.append(int(pos))
            if len(chosen) == 2 * k:
                return np.array(chosen, dtype=np.int64)
    raise ValueError(
        f"swap-pair cannot form {k} pairs of different classes from {labels.shape[0]} train samples "
        f"(largest class has {int(np.bincount(labels).max())}); lower noise or use swap-class"
    )


def _mixed_class_matching(
    labels: np.ndarray, chosen: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random perfect matching of ``chosen`` in which every pair mixes two classes.

    Start from a uniformly random matching, then repair each same-class pair (a, a') by
    trading a' with one member of a random pair (b, b') that has no member of a's class:
    (a, b) and (a', b') are then both mixed. Such a pair always exists because no class holds
    more than half of ``chosen``; each repair removes one bad pair and creates none.
    """
    pairs = rng.permutation(chosen).reshape(-1, 2)
    cls = labels[pairs]
    for i in np.flatnonzero(cls[:, 0] == cls[:, 1]):
        c = cls[i, 0]
        if cls[i, 1] != c:  # already repaired as an earlier pair's donor
            continue
        donors = np.flatnonzero((cls[:, 0] != c) & (cls[:, 1] != c))
        j = int(rng.choice(donors))
        pairs[[i, j], 1] = pairs[[j, i], 1]
        cls[[i, j], 1] = cls[[j, i], 1]
    return pairs[:, 0], pairs[:, 1]


# --- writing ------------------------------------------------------------------------------------


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create the split folders; refuse (or, with overwrite, clear) an earlier corpus."""
    previous = [out / "corpus.json", out / "truth.parquet", out / "classes.json"]
    previous += [p for s in SPLITS for p in sorted((out / s).glob(f"{s}-*.tar"))]
    existing = [p for p in previous if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a corpus ({existing[0]} and {len(existing) - 1} more); "
            "pass overwrite=True to replace it"
        )
    for p in existing:
        p.unlink()
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)


def _write_split(
    out: Path,
    split: str,
    data: LabelledImages,
    picks: np.ndarray,
    captions: tuple[np.ndarray, np.ndarray],
    shard_size: int,
    bar: tqdm,
) -> tuple[list[Path], pa.Table]:
    """Write one split's shards in order; return their paths and the split's truth rows."""
    caption_label, template = captions
    rows: dict[str, list] = {name: [] for name in TRUTH_SCHEMA.names}
    paths: list[Path] = []
    bar.set_postfix_str(split)
    for start in range(0, len(picks), shard_size):
        path = out / split / shard_name(split, start // shard_size)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as stream:
            writer = TarWriter(stream, encoder=False, mtime=_TAR_MTIME)
            for i in range(start, min(start + shard_size, len(picks))):
                sample = _sample(split, i, data, int(picks[i]), int(caption_label[i]), int(template[i]))
                writer.write(sample["tar"])
                for name, value in sample["truth"].items():
                    rows[name].append(value)
                rows["shard"].append(path.name)
                bar.update(1)
            writer.close()
        tmp.replace(path)  # a shard appears whole or not at all
        paths.append(path)
    return paths, pa.table(rows, schema=TRUTH_SCHEMA)


def _sample(split: str, i: int, data: LabelledImages, source: int, caption_label: int, template: int) -> dict:
    """One webdataset sample (encoded members) and its truth row."""
    label = int(data.labels[source])
    true_class, caption_class = data.class_names[label], data.class_names[caption_label]
    key = sample_key(split, i)
    caption = caption_for(caption_class, template)
    meta = {
        "label": label,
        "class_name": true_class,
        "caption_label": caption_label,
        "caption_class": caption_class,
        "template": template,
        "misaligned": caption_label != label,
        "source_index": source,
    }
    tar = {
        "__key__": key,
        "png": _png(data.images[source]),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    truth = {
        "key": key,
        "split": split,
        "misaligned": meta["misaligned"],
        "true_class": true_class,
        "caption_class": caption_class,
        "label": label,
        "caption_label": caption_label,
        "template": template,
        "source_index": source,
        "caption": caption,
    }
    return {"tar": tar, "truth": truth}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("L").save(buf, format="PNG")
    return buf.getvalue()


def _manifest(spec: CorpusSpec, data: LabelledImages, summary: CorpusSummary) -> dict:
    """Provenance: enough to rebuild the corpus and to check a copy of it."""
    return {
        "ecif_ray_version": __version__,
        "spec": spec.to_json(),
        "dataset": {"name": data.name, "size": len(data), "image_shape": list(data.images.shape[1:])},
        "sizes": spec.sizes(),
        "counts": summary.counts,
        "misaligned": summary.misaligned,
        "misaligned_fraction": summary.misaligned / summary.counts["train"] if summary.counts["train"] else None,
        "shards": {s: [p.name for p in paths] for s, paths in summary.shards.items()},
        "classes": list(data.class_names),
        "templates": list(CAPTION_TEMPLATES),
    }


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
