"""vitkit search: the gallery images most similar to query images, from an index `vitkit index` built."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "find the most similar images in an index (vitkit index) for query images: cosine similarity, top-k"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="an index from `vitkit index` (NAME, NAME.safetensors or NAME.json)")
    p.add_argument("images", nargs="+", help="query image files or folders")
    p.add_argument("--topk", type=int, default=5, help="how many matches per query (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per query per line instead of text")
    p.add_argument(
        "--checkpoint",
        help="embed the queries with this checkpoint (default: the one the index records); it must be the same "
        "model, else the search is refused",
    )
    p.add_argument(
        "--engine",
        choices=("auto", "exact", "faiss"),
        default="auto",
        help="exact: cosine search in torch; faiss: HNSW (approximate); auto: faiss over 100k images if installed",
    )
    p.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from ..infer.embed import embed_all, expand_image_paths, load_model
    from ..infer.retrieval import RetrievalIndex, model_fingerprint

    index = RetrievalIndex.load(args.index)
    try:
        model = load_model(args.checkpoint or index.checkpoint)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the index was built with '{index.checkpoint}'; pass --checkpoint)") from None
    fingerprint = model_fingerprint(model)
    index.check_fingerprint(fingerprint)  # before embedding anything: a query from another model is refused at once
    paths = expand_image_paths(args.images)
    queries = embed_all(model, paths, [str(p) for p in paths], batch_size=args.batch_size, precision=index.precision)
    found = index.search(queries.features, fingerprint, args.topk, args.engine) if queries.names else []
    matches_of = dict(zip(queries.names, found))
    failure_of = {f.image: f for f in queries.failures}
    for name in map(str, paths):  # input order, failures in their place
        if name in failure_of:
            print(f"vitkit search: {failure_of[name].error}", file=sys.stderr)
            if args.json:
                print(json.dumps(failure_of[name].to_dict(), ensure_ascii=False))
        elif args.json:
            print(json.dumps({"image": name, "matches": [m.to_dict() for m in matches_of[name]]}, ensure_ascii=False))
        else:
            print(f"{name}:")
            for m in matches_of[name]:
                label = f" [{m.label}]" if m.label is not None else ""
                print(f"  {m.rank}. {m.name}{label}  {m.score:.4f}")
    if queries.failures:
        print(f"vitkit search: {len(queries.failures)} of {len(paths)} query image(s) failed", file=sys.stderr)
    return 1 if queries.failures else 0
