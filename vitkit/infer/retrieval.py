"""Search by image: an index of pooled embeddings, exact cosine search in torch, faiss for large indexes.

An index holds one L2-normalised pooled embedding per image (`forward_head(tokens, pre_logits=True)`, the vector a
head would see), so the dot product of two rows is their cosine similarity. On disk it is two files, three with
faiss, all written through `files.atomic_write`:

    NAME.safetensors   the embeddings (N, D) float32, and the labels (N,) int64 when the source had classes
    NAME.json          the sidecar: the checkpoint and its fingerprint, precision, image names, classes, skipped
    NAME.faiss         an HNSW graph over the same vectors (large indexes, when faiss is installed)

The tensors are written first and the sidecar last, both carrying the same random id: a crash between the two
leaves a pair whose ids differ, and loading says so instead of pairing names with the wrong rows.

The index records the fingerprint of the model that embedded it (a hash of the weights the pooled features depend
on, and the preprocessing); `RetrievalIndex.search` refuses queries whose model fingerprint differs, because vectors
from two models share no space and their cosines mean nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import ImageArrayDataset, align_classes
from ..files import atomic_write, atomic_write_bytes
from .embed import embed_all, embed_array, expand_image_paths, load_model
from .predict import Failure

INDEX_FORMAT = "vitkit-index"
INDEX_VERSION = 1
SUFFIXES = (".safetensors", ".json", ".faiss")
ENGINES = ("auto", "exact", "faiss")
# Up to this many vectors exact search is a few matrix products (one per chunk) and needs no graph to build or
# store; beyond it `auto` builds and uses faiss's HNSW graph when faiss is installed.
FAISS_MIN_VECTORS = 100_000
HNSW_NEIGHBOURS = 32  # faiss's HNSW M: links per vector (the value faiss's own benchmarks use for ~1M vectors)
QUERY_CHUNK = 1024  # exact search: the (queries, gallery) similarity block is at most QUERY_CHUNK x GALLERY_CHUNK
GALLERY_CHUNK = 65_536


# ------------------------------------------------------------------------------------------------ fingerprint
def model_fingerprint(model: nn.Module) -> str:
    """A hash of what a model's pooled features depend on: the weights (the classifier head's left out) and the
    configuration and preprocessing. Two models with the same fingerprint embed every image to the same vector.

    The head is left out because `pre_logits` features never pass through it: a checkpoint whose head was retrained
    on other classes still searches an index built with the encoder it shares.
    """
    h = hashlib.blake2b(digest_size=16)
    # patch dropout acts in training only (eval sees every token); left out so that indexes keep their fingerprint
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in ("num_classes", "patch_drop_rate")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(json.dumps(model.preprocess.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- search
def exact_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    query_chunk: int = QUERY_CHUNK,
    gallery_chunk: int = GALLERY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k: queries (Q, D), gallery (N, D), both L2-normalised -> scores, indices (Q, k').

    k' = min(k, N). The gallery goes in chunks, each chunk's top-k merged with the running best, so the similarity
    block in memory stays (query_chunk, gallery_chunk) whatever N is. Ties keep the lower gallery index first.
    """
    k = min(k, len(gallery))
    all_scores, all_indices = [], []
    for qs in range(0, len(queries), query_chunk):
        q = queries[qs : qs + query_chunk].float()
        best_s = torch.full((len(q), 0), float("-inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.int64)
        for gs in range(0, len(gallery), gallery_chunk):
            sims = q @ gallery[gs : gs + gallery_chunk].float().T  # (q, c)
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            merged_s, merged_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i + gs], dim=1)
            order = merged_s.topk(min(k, merged_s.shape[1]), dim=1).indices
            best_s, best_i = merged_s.gather(1, order), merged_i.gather(1, order)
        all_scores.append(best_s)
        all_indices.append(best_i)
    if not all_scores:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat(all_scores), torch.cat(all_indices)


def _faiss(feature: str):
    from ..optional import require

    return require("faiss", feature)


def build_hnsw(vectors: np.ndarray):
    """A faiss HNSW graph over L2-normalised vectors (N, D), searched by inner product (= cosine)."""
    faiss = _faiss("the faiss search engine (--engine faiss)")
    graph = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    graph.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return graph


def hnsw_topk(graph, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate inner-product top-k through an HNSW graph: scores, indices (Q, k'); the search breadth grows
    with k so that asking for more neighbours does not lower the recall of the first ones."""
    k = min(k, graph.ntotal)
    graph.hnsw.efSearch = max(64, 2 * k)
    scores, indices = graph.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return torch.from_numpy(scores), torch.from_numpy(indices.astype(np.int64))


def choose_engine(engine: str, count: int) -> str:
    """ "exact" or "faiss" for an index of `count` vectors: `auto` takes faiss for large indexes when installed."""
    from ..optional import available

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        return "faiss" if count > FAISS_MIN_VECTORS and available("faiss") else "exact"
    return engine


# ------------------------------------------------------------------------------------------------ the index
@dataclass
class Match:
    """One gallery image found for a query, best first."""

    rank: int
    index: int  # row in the index
    name: str
    label: str | None
    score: float  # cosine similarity in [-1, 1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class IndexFiles:
    """Where an index's files lie: `NAME` given with or without one of the suffixes."""

    tensors: Path
    sidecar: Path
    graph: Path

    @classmethod
    def of(cls, path: str | Path) -> IndexFiles:
        path = Path(path)
        base = path.with_suffix("") if path.suffix in SUFFIXES else path
        return cls(*(base.with_name(base.name + suffix) for suffix in SUFFIXES))


@dataclass
class RetrievalIndex:
    """L2-normalised embeddings with the names, labels and model they came from; searched by cosine similarity."""

    vectors: torch.Tensor  # (N, D) float32, rows of unit length
    names: list[str]
    checkpoint: str  # the checkpoint the vectors were embedded with, as given to `vitkit index`
    fingerprint: str  # `model_fingerprint` of that model
    precision: str = "bf16"
    labels: np.ndarray | None = None  # (N,) int64 into `classes`, or None for an unlabelled source
    classes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason) left out of the index
    graph: Any = None  # a faiss HNSW graph over `vectors`, when one was built or loaded

    def __len__(self) -> int:
        return len(self.names)

    def label_of(self, row: int) -> str | None:
        return None if self.labels is None else self.classes[int(self.labels[row])]

    # ------------------------------------------------------------------------------------------------ search
    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse vectors from another model: their cosines against this index would be meaningless."""
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"the queries were embedded by a different model (fingerprint {fingerprint[:12]}) than this index "
                f"(fingerprint {self.fingerprint[:12]}, from '{self.checkpoint}'); embed them with that checkpoint"
            )

    def search(
        self, queries: np.ndarray | torch.Tensor, fingerprint: str, topk: int = 5, engine: str = "auto"
    ) -> list[list[Match]]:
        """The `topk` most cosine-similar index rows of each query (Q, D), best first.

        Args:
            queries: pooled embeddings (normalised here), from the model whose `model_fingerprint` is `fingerprint`.
            fingerprint: the queries' model fingerprint; a different one from the index's raises ValueError.
            engine: "exact" (torch), "faiss" (HNSW, approximate), or "auto" (faiss for large indexes if installed).
        """
        self.check_fingerprint(fingerprint)
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries must be (Q, {self.vectors.shape[1]}) pooled embeddings, got {tuple(q.shape)}")
        q = F.normalize(q, dim=1)
        if choose_engine(engine, len(self)) == "faiss":
            if self.graph is None:
                self.graph = build_hnsw(self.vectors.numpy())
            scores, indices = hnsw_topk(self.graph, q.numpy(), topk)
        else:
            scores, indices = exact_topk(q, self.vectors, topk)
        return [
            [
                Match(rank + 1, int(i), self.names[int(i)], self.label_of(int(i)), round(float(s), 6))
                for rank, (s, i) in enumerate(zip(row_s, row_i))
                if i >= 0  # faiss pads with -1 when it found fewer than k
            ]
            for row_s, row_i in zip(scores, indices)
        ]

    # ----------------------------------------------------------------------------------------------- storage
    def save(self, path: str | Path, engine: str = "auto") -> IndexFiles:
        """Write the tensors, the faiss graph (engine "faiss", or "auto" for a large index with faiss installed),
        then the sidecar; returns where they went."""
        from safetensors.torch import save_file

        files = IndexFiles.of(path)
        with_graph = choose_engine(engine, len(self)) == "faiss"
        if with_graph and self.graph is None:  # before any file is written: a missing faiss leaves the old index whole
            self.graph = build_hnsw(self.vectors.numpy())
        index_id = secrets.token_hex(8)
        tensors = {"embeddings": self.vectors.contiguous()}
        if self.labels is not None:
            tensors["labels"] = torch.from_numpy(np.asarray(self.labels, dtype=np.int64))
        with atomic_write(files.tensors) as tmp:
            save_file(tensors, str(tmp), metadata={"format": INDEX_FORMAT, "id": index_id})
        ann = None
        if with_graph:
            faiss = _faiss("the faiss search engine (--engine faiss)")
            with atomic_write(files.graph) as tmp:
                faiss.write_index(self.graph, str(tmp))
            ann = {"kind": "faiss-hnsw", "file": files.graph.name, "neighbours": HNSW_NEIGHBOURS}
        else:
            files.graph.unlink(missing_ok=True)  # a graph of an earlier index under this name no longer matches
        sidecar = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "id": index_id,
            "count": len(self),
            "dim": int(self.vectors.shape[1]),
            "checkpoint": self.checkpoint,
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "sources": self.sources,
            "classes": self.classes if self.labels is not None else None,
            "ann": ann,
            "names": self.names,
            "skipped": [list(s) for s in self.skipped],
        }
        atomic_write_bytes(files.sidecar, json.dumps(sidecar, ensure_ascii=False).encode())
        return files

    @classmethod
    def load(cls, path: str | Path) -> RetrievalIndex:
        """Read an index written by `save` (NAME with or without a suffix); a mismatched or broken pair raises
        ValueError naming the file."""
        from safetensors import safe_open

        files = IndexFiles.of(path)
        for f in (files.tensors, files.sidecar):
            if not f.is_file():
                raise FileNotFoundError(f"index file '{f}' does not exist (an index is NAME.safetensors + NAME.json)")
        try:
            meta = json.loads(files.sidecar.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"'{files.sidecar}' is not an index sidecar: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"'{files.sidecar}' is not a vitkit index sidecar (no format '{INDEX_FORMAT}')")
        if meta.get("version", 0) > INDEX_VERSION:
            raise ValueError(f"'{files.sidecar}' is index version {meta['version']}; this vitkit reads {INDEX_VERSION}")
        try:
            with safe_open(str(files.tensors), framework="pt") as f:
                header = f.metadata() or {}
                vectors = f.get_tensor("embeddings").float()
                labels = f.get_tensor("labels").numpy() if "labels" in f.keys() else None
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"'{files.tensors}' could not be read as index tensors: {e}") from None
        if header.get("id") != meta.get("id"):
            raise ValueError(
                f"'{files.tensors}' and '{files.sidecar}' belong to different writes of the index (ids differ): "
                "build the index again"
            )
        names, classes = list(meta["names"]), meta.get("classes") or []
        if vectors.ndim != 2 or len(vectors) != len(names) or (labels is not None and len(labels) != len(names)):
            raise ValueError(f"'{files.tensors}': {tuple(vectors.shape)} embeddings for {len(names)} names")
        graph = None
        if meta.get("ann") and files.graph.is_file():
            from ..optional import available

            if available("faiss"):
                graph = _faiss("the faiss search engine").read_index(str(files.graph))
                if graph.ntotal != len(names):  # a graph left by another write: exact search is still right
                    graph = None
        return cls(
            vectors=vectors,
            names=names,
            checkpoint=meta["checkpoint"],
            fingerprint=meta["fingerprint"],
            precision=meta.get("precision", "bf16"),
            labels=labels,
            classes=list(classes),
            sources=list(meta.get("sources", [])),
            skipped=[tuple(s) for s in meta.get("skipped", [])],
            graph=graph,
        )


# ------------------------------------------------------------------------------------------------- building
def is_file_source(spec: str) -> bool:
    """Whether `spec` is an image file or a folder (read file by file, names kept) rather than a dataset spec
    (an archive, a CSV or a built-in set, read through `load_source` and its decode cache)."""
    from .embed import IMAGE_SUFFIXES

    p = Path(spec)
    return p.is_dir() or (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder_labels(root: Path, paths: Sequence[Path]) -> tuple[list[int] | None, list[str]]:
    """Class labels from a folder's layout, as `--data` reads an image folder: the class is the first folder below
    the deepest folder all images share. (None, []) when an image lies above that level (no class layout)."""
    dirs = [p.relative_to(root).parts[:-1] for p in paths]
    shared = 0
    while all(len(d) > shared for d in dirs) and len({d[shared] for d in dirs}) == 1:
        shared += 1
    if not dirs or any(len(d) <= shared for d in dirs):
        return None, []
    names = [d[shared] for d in dirs]
    classes = sorted(set(names))
    return [classes.index(n) for n in names], classes


def index_files(
    model: nn.Module, sources: Sequence[str], batch_size: int = 64, precision: str = "bf16"
) -> tuple[torch.Tensor, list[str], np.ndarray | None, list[str], list[Failure]]:
    """Embed image files and folders: (vectors (M, D), names, labels or None, classes, failures).

    Labels come from the folder layout when one folder is given and its images lie in class folders (as for
    `--data`); names are the paths as found. Bad images are skipped and returned as failures.
    """
    paths = expand_image_paths(sources)
    labels, classes = None, []
    if len(sources) == 1 and Path(sources[0]).is_dir():
        labels, classes = image_folder_labels(Path(sources[0]), paths)
    result = embed_all(model, paths, [str(p) for p in paths], batch_size=batch_size, precision=precision)
    kept = None
    if labels is not None:
        by_name = dict(zip(map(str, paths), labels))
        kept = np.asarray([by_name[n] for n in result.names], dtype=np.int64)
    vectors = F.normalize(torch.from_numpy(result.features).float(), dim=1)
    return vectors, result.names, kept, classes, result.failures


def index_dataset(
    model: nn.Module, ds: ImageArrayDataset, spec: str, batch_size: int = 256, precision: str = "bf16"
) -> tuple[torch.Tensor, list[str], np.ndarray, list[str]]:
    """Embed a decoded dataset (`load_source`): (vectors, names `SPEC[i]` in the dataset's order, labels, classes).

    The decode cache keeps no file names, so a row is named by its position in the source (sorted by file name).
    """
    feats = embed_array(model, ds.images, batch_size=batch_size, precision=precision)
    vectors = F.normalize(torch.from_numpy(feats).float(), dim=1)
    return vectors, [f"{spec}[{i}]" for i in range(len(ds))], np.asarray(ds.labels, dtype=np.int64), list(ds.classes)


def build_index(
    checkpoint: str | Path | nn.Module,
    sources: Sequence[str],
    *,
    batch_size: int = 64,
    precision: str = "bf16",
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[RetrievalIndex, list[Failure]]:
    """Embed `sources` with a checkpoint into a RetrievalIndex; also returns the images that were skipped.

    Args:
        checkpoint: a checkpoint (any format `from_pretrained` reads) or a loaded model (recorded as "<model>").
        sources: image files and folders (names kept; a folder of class folders gives labels), or one dataset
            spec `--data` accepts (a .tar/.csv of labelled images, digits, cifar10, ...).
    """
    from ..data.sources import load_source

    model = load_model(checkpoint)
    name = "<model>" if isinstance(checkpoint, nn.Module) else _recorded_name(checkpoint)
    failures: list[Failure] = []
    if all(is_file_source(s) for s in sources):
        vectors, names, labels, classes, failures = index_files(model, sources, batch_size, precision)
    elif len(sources) == 1:
        ds = load_source(sources[0], cache_dir=cache_dir, progress=progress)
        vectors, names, labels, classes = index_dataset(model, ds, sources[0], batch_size, precision)
        failures = [Failure(n, f"image '{n}': {reason}") for n, reason in ds.skipped]
    else:
        odd = next(s for s in sources if not is_file_source(s))
        if not Path(odd).exists():
            raise FileNotFoundError(f"image '{odd}' does not exist")
        raise ValueError(f"'{odd}' is not an image or a folder; a dataset (.tar, .csv, digits, ...) must come alone")
    if not names:
        raise ValueError(f"none of the images in {list(sources)} could be embedded; no index written")
    index = RetrievalIndex(
        vectors=vectors,
        names=names,
        checkpoint=name,
        fingerprint=model_fingerprint(model),
        precision=precision,
        labels=labels,
        classes=classes,
        sources=[str(s) for s in sources],
        skipped=[(f.image, f.error) for f in failures],
    )
    return index, failures


def _recorded_name(checkpoint: str | Path) -> str:
    """An existing checkpoint as an absolute path (search finds it from any folder); a Hub name as given."""
    p = Path(checkpoint)
    return str(p.resolve()) if p.exists() else str(checkpoint)


# ----------------------------------------------------------------------------------------------- evaluation
def recall_at_k(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """Recall@k: the fraction of queries with at least one gallery image of their own label among their k most
    cosine-similar (exact search). queries (Q, D), gallery (N, D), labels int64 in one class numbering."""
    if len(queries) == 0 or len(gallery) == 0:
        raise ValueError("recall@k needs at least one query and one gallery image")
    q, g = F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1)
    _, idx = exact_topk(q, g, max(ks))
    hits = gallery_labels.long()[idx] == query_labels.long()[:, None]  # (Q, k)
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


@dataclass
class RetrievalReport:
    """Recall@k of labelled queries against a labelled gallery."""

    recall: dict[int, float]
    queries: int
    gallery: int
    classes: int

    def to_dict(self) -> dict[str, Any]:
        return {**{f"recall@{k}": v for k, v in self.recall.items()}, "queries": self.queries, "gallery": self.gallery}


def evaluate_retrieval(
    model: nn.Module,
    queries: ImageArrayDataset,
    gallery: ImageArrayDataset,
    query_idx: np.ndarray | None = None,
    gallery_idx: np.ndarray | None = None,
    *,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 256,
    precision: str = "bf16",
) -> RetrievalReport:
    """Recall@k of `queries` (rows `query_idx`) against `gallery` (rows `gallery_idx`), labels matched by class
    name; both embedded with the model's evaluation preprocessing. The model is left in the mode it came in."""
    classes = list(dict.fromkeys([*gallery.classes, *queries.classes]))  # one numbering for both
    gallery, queries = align_classes(gallery, classes), align_classes(queries, classes)
    q_idx = np.arange(len(queries)) if query_idx is None else np.sort(query_idx)  # sorted: memmap reads in order
    g_idx = np.arange(len(gallery)) if gallery_idx is None else np.sort(gallery_idx)
    was_training = model.training

    def embed(ds: ImageArrayDataset, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(embed_array(model, ds.images[idx], batch_size=batch_size, precision=precision))

    q_feats, g_feats = embed(queries, q_idx), embed(gallery, g_idx)
    model.train(was_training)
    q_labels = torch.from_numpy(np.asarray(queries.labels, dtype=np.int64)[q_idx])
    g_labels = torch.from_numpy(np.asarray(gallery.labels, dtype=np.int64)[g_idx])
    recall = recall_at_k(q_feats, q_labels, g_feats, g_labels, ks)
    return RetrievalReport(recall, len(q_idx), len(g_idx), len(classes))


__all__ = [
    "RetrievalIndex",
    "IndexFiles",
    "Match",
    "RetrievalReport",
    "build_index",
    "evaluate_retrieval",
    "exact_topk",
    "model_fingerprint",
    "recall_at_k",
    "choose_engine",
    "FAISS_MIN_VECTORS",
]
