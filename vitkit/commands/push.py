"""vitkit push: a checkpoint -> a Hugging Face Hub repo, as a vitkit, transformers or timm folder with a model card."""

from __future__ import annotations

import argparse

HELP = "upload a checkpoint to the Hugging Face Hub (vitkit, transformers or timm layout, with a model card)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model checkpoint (any format or name vitkit.from_pretrained reads)")
    p.add_argument("repo_id", help="the Hub repo, OWNER/NAME (created when missing)")
    p.add_argument(
        "--format",
        choices=("vitkit", "hf", "timm"),
        default="vitkit",
        help="vitkit (default: model.safetensors with everything inside), hf (transformers ViT) or timm (hf-hub:)",
    )
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the `hf auth login` token)")
    p.add_argument("--revision", "--branch", dest="revision", help="branch to commit to (created when missing)")
    p.add_argument("--commit-message", help="the commit's message (default: 'Upload FORMAT model with vitkit')")
    p.add_argument("--license", help="the model card's license field, e.g. apache-2.0 (a new README only)")


def run(args: argparse.Namespace) -> int:
    from ..interop import from_pretrained
    from ..interop.push import push_to_hub

    model = from_pretrained(args.checkpoint)
    url = push_to_hub(
        model,
        args.repo_id,
        format=args.format,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
        source=args.checkpoint,
        license=args.license,
    )
    print(f"pushed {args.checkpoint} to {args.repo_id} as a {args.format} folder: {url}")
    return 0
